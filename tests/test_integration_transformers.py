"""The HF Trainer callback on a tiny GPT-2 built from a config (nothing downloaded).

Oracles: the Trainer's own log (`trainer.state.log_history`, with logging_steps=1): its
`grad_norm` is the total norm `accelerator.clip_grad_norm_` returns before it clips, and its
`loss` is the step's loss over the micro-batches. The TensorBoard test compares graddoctor's
mirrored `graddoctor/grad_norm` with the Trainer's own `train/grad_norm` in the same event files.
"""
import numpy as np
import pytest
import torch

import graddoctor as gd

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.slow  # importing transformers' Trainer takes seconds; each run ~1 s

MAX_GRAD_NORM = 0.1
# The same float32 gradients, their norm summed in another order (foreach per tensor vs. watch's
# pass): a few ulps times sqrt(number of tensors) apart, far below this.
NORM_RTOL = 1e-5
# The Trainer's loss adds the micro-batches' float32 losses in its own order.
LOSS_RTOL = 1e-6


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
                            WANDB_SILENT="true").items():
        monkeypatch.setenv(name, value)


def _trainer(tmp_path, callback, n_samples=18, extra_callbacks=(), **args):
    """A Trainer on a 2-layer GPT-2; 18 samples in batches of 4 make 5 micro-batches an epoch, so with
    gradient_accumulation_steps=2 the epoch's last optimizer step has a single micro-batch."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(n_samples):
        ids = torch.randint(0, 64, (16,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    max_grad_norm=MAX_GRAD_NORM, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                    num_train_epochs=2, learning_rate=1e-3, disable_tqdm=True)
    settings.update(args)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=data, eval_dataset=data[:4],
                   callbacks=[callback, *extra_callbacks])


def _logged(trainer, key):
    return np.array([entry[key] for entry in trainer.state.log_history if "grad_norm" in entry])


def test_records_the_raw_gradients_before_the_trainers_clipping_one_step_per_optimizer_step(tmp_path):
    from graddoctor.integrations.transformers import GradDoctorCallback
    callback = GradDoctorCallback(live_diagnosis=False)  # run_dir=None: <output_dir>/graddoctor
    # evaluation every 2 steps: forwards under no_grad between the micro-batches must change nothing
    trainer = _trainer(tmp_path, callback, eval_strategy="steps", eval_steps=2)
    trainer.train()
    run = gd.open_run(tmp_path / "out" / "graddoctor")
    steps, norms = run.global_norm()
    assert trainer.state.global_step == 6  # 2 epochs of 3 optimizer steps, the third of 1 micro-batch
    assert list(steps) == list(range(trainer.state.global_step))
    np.testing.assert_allclose(norms, _logged(trainer, "grad_norm"), rtol=NORM_RTOL)
    assert norms.min() > MAX_GRAD_NORM  # recorded before the Trainer clipped them to 0.1
    loss_steps, losses = run.loss()
    assert list(loss_steps) == list(steps) and np.isfinite(losses).all()
    np.testing.assert_allclose(losses, _logged(trainer, "loss"), rtol=LOSS_RTOL)
    assert callback.watch is None and not trainer.model._forward_hooks  # closed at on_train_end, hook removed


def test_reentrant_activation_checkpointing_still_records_the_whole_backward(tmp_path):
    """Reentrant checkpointing runs nested backwards inside the outer one; the step waits for the outer."""
    from graddoctor.integrations.transformers import GradDoctorCallback
    trainer = _trainer(tmp_path, GradDoctorCallback(tmp_path / "run", live_diagnosis=False), num_train_epochs=1,
                       activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    trainer.train()
    steps, norms = gd.open_run(tmp_path / "run").global_norm()
    assert len(steps) == trainer.state.global_step == 3
    np.testing.assert_allclose(norms, _logged(trainer, "grad_norm"), rtol=NORM_RTOL)


def test_report_to_tensorboard_mirrors_beside_the_trainers_own_scalars(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from graddoctor.integrations.transformers import GradDoctorCallback
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # the Trainer's and graddoctor's
    trainer = _trainer(tmp_path, GradDoctorCallback(tmp_path / "run", flush_every=2, live_diagnosis=False),
                       num_train_epochs=1, report_to=["tensorboard"])
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    ours = events.Scalars("graddoctor/grad_norm")
    theirs = {e.step: e.value for e in events.Scalars("train/grad_norm")}
    assert [e.step for e in ours] == [0, 1, 2]  # graddoctor's step k is the Trainer's global_step k + 1
    np.testing.assert_allclose([e.value for e in ours], [theirs[e.step + 1] for e in ours], rtol=NORM_RTOL)


def test_a_train_that_raises_leaves_the_steps_so_far_and_close_ends_it(tmp_path):
    """The Trainer calls no callback when training raises: the watch stays open (graddoctor closes it at
    exit), and `close()` or the next train() closes it; the steps recorded so far are kept."""
    from transformers import TrainerCallback

    from graddoctor.integrations.transformers import GradDoctorCallback

    class Crash(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):  # after step 2 is in the log history
            if state.global_step == 2:
                raise RuntimeError("crash at step 2")

    callback = GradDoctorCallback(tmp_path / "run", live_diagnosis=False)
    trainer = _trainer(tmp_path, callback, extra_callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="crash at step 2"):
        trainer.train()
    assert callback.watch is not None and not callback.watch.closed
    callback.close()
    assert not trainer.model._forward_hooks
    steps, norms = gd.open_run(tmp_path / "run").global_norm()
    assert list(steps) == [0, 1]
    np.testing.assert_allclose(norms, _logged(trainer, "grad_norm"), rtol=NORM_RTOL)


def test_bad_options_are_refused_when_the_callback_is_made(tmp_path):
    from graddoctor.integrations.transformers import GradDoctorCallback
    with pytest.raises(gd.ConfigError, match="flush_every=0"):
        GradDoctorCallback(tmp_path / "run", flush_every=0)
    with pytest.raises(gd.ConfigError, match="unknown watch option"):
        GradDoctorCallback(tmp_path / "run", flush_evry=10)


def test_under_ddp_the_step_sees_the_all_reduced_gradients(tmp_path):
    """DDP finishes its all-reduce in an end-of-backward callback of its own; the step must come after it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("_hf_ddp_worker.py")
    env = dict(os.environ, RENDEZVOUS=f"file://{tmp_path}/rendezvous", WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(worker)], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {"steps": 1, "equal_averaged": True, "differ_local": True}


def test_report_to_mlflow_mirrors_into_the_run_the_trainers_mlflow_callback_started(tmp_path, monkeypatch):
    import mlflow

    from graddoctor.integrations.transformers import GradDoctorCallback
    uri = (tmp_path / "mlruns").as_uri()
    for name, value in dict(MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_TRACKING_URI=uri,
                            HF_MLFLOW_LOG_ARTIFACTS="0").items():
        monkeypatch.setenv(name, value)
    # Another test module may have left MLflow's process-global state behind (a tracking URI set with
    # set_tracking_uri wins over the environment; an active run would be reused by the Trainer's callback).
    while mlflow.active_run() is not None:
        mlflow.end_run()
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    trainer = _trainer(tmp_path, GradDoctorCallback(tmp_path / "run", flush_every=2, live_diagnosis=False),
                       num_train_epochs=1, report_to=["mlflow"])
    try:
        trainer.train()
    finally:
        mlflow.end_run()  # no run left active for later tests (a no-op when the Trainer ended it)
        mlflow.set_tracking_uri(previous_uri)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    ours = client.get_metric_history(run.info.run_id, "graddoctor/grad_norm/global")  # MLflow's name, see Mirrors
    theirs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "grad_norm")}
    assert [m.step for m in ours] == [0, 1, 2]
    np.testing.assert_allclose([m.value for m in ours], [theirs[m.step + 1] for m in ours], rtol=NORM_RTOL)
