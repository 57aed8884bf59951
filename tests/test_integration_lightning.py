"""GradDoctorCallback in real Lightning fits on the CPU.

Oracles, each taken independently of graddoctor:
- gradient norms: `torch.nn.utils.get_total_norm` of the gradients, taken by a test callback in
  `on_before_optimizer_step` placed before ours (before Lightning clips), and after the optimizer
  step by an optimizer post-hook (the clipped gradients, to show clipping happened);
- the step's loss: the mean of the micro-batch losses `training_step` computed, kept by the module;
- the number of optimizer steps: that post-hook's count and `trainer.global_step`.
Tolerances are float32 rounding bounds from tests/_numerics.py.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graddoctor as gd
from _numerics import U32, norm_rel, rel_diff_tol, total_norm_rel
from graddoctor import ConfigError
from graddoctor.integrations.lightning import GradDoctorCallback

WORKER = Path(__file__).with_name("_lightning_ddp_worker.py")
# The largest tensor has 8 * 16 entries; 4 tensors. Both sides are float32 norms of the same gradients.
NORM_RTOL = rel_diff_tol(total_norm_rel(norm_rel(8 * 16), 4), total_norm_rel(norm_rel(8 * 16), 4))
CLIP = 0.1


class Tiny(L.LightningModule):
    """A two-layer regressor; keeps each micro-batch's loss (float64 copy) as the loss oracle."""

    def __init__(self, fail_at_batch: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.losses: list[float] = []
        self.fail_at_batch = fail_at_batch

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at_batch and self.current_epoch == 0:
            raise RuntimeError("training_step failed on purpose")
        x, y = batch
        loss = (self(x).float() - y).pow(2).mean()
        self.losses.append(float(loss.detach().double()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class NormOracle(Callback):
    """Pre-clip norms (in on_before_optimizer_step), post-step norms and the optimizer step count."""

    def __init__(self):
        self.pre: list[float] = []
        self.post: list[float] = []
        self.steps = 0

    def on_fit_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, *_):
        self.steps += 1
        self.post.append(_total_norm(optimizer.param_groups[0]["params"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append(_total_norm(pl_module.parameters()))


def _total_norm(params) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def _loader(n=32, batch=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = 10 * torch.randn(n, 1, generator=g)  # large targets: every step's gradient norm is well above CLIP
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(tmp_path, callbacks, logger=False, **kw):
    kw.setdefault("max_epochs", 2)
    return L.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=logger, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw)


def _fit(trainer, module):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers|log_every_n_steps).*")
        trainer.fit(module, _loader())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_means(losses, accumulate):
    return np.asarray(losses, dtype=np.float64).reshape(-1, accumulate).mean(axis=1)


def test_records_every_optimizer_step_before_clipping_with_the_step_loss(tmp_path):
    oracle = NormOracle()
    run_dir = tmp_path / "gd"
    module = Tiny()
    logger = TensorBoardLogger(tmp_path / "tb")
    trainer = _trainer(tmp_path, [oracle, GradDoctorCallback(run_dir, flush_every=3)],
                       logger=logger, accumulate_grad_batches=2, gradient_clip_val=CLIP)
    _fit(trainer, module)

    run = gd.open_run(run_dir)
    steps, norms = run.global_norm()
    assert oracle.steps == trainer.global_step == 8  # 2 epochs of 8 batches, 2 micro-batches per step
    np.testing.assert_array_equal(steps, np.arange(oracle.steps))
    np.testing.assert_allclose(norms, oracle.pre, rtol=NORM_RTOL, atol=0)
    # clipping happened after the record: the clipped norms are at the threshold, the recorded ones above it
    assert max(oracle.post) <= CLIP * (1 + 1e-5)
    assert norms.min() > 10 * CLIP

    loss_steps, losses = run.loss()
    np.testing.assert_array_equal(loss_steps, steps)
    expected = _step_means(module.losses, 2)
    # Lightning passes each micro-batch loss / 2 (exact); their float32 sum rounds once
    np.testing.assert_allclose(losses, expected, rtol=2 * U32, atol=0)
    assert run.meta.get("closed_at") is not None

    # the logger's event files hold the mirrored scalars, at graddoctor's steps (TensorBoard keeps float32)
    scalars = _tb_scalars(logger.log_dir)
    tb_norm = scalars["graddoctor/grad_norm"]
    assert sorted(tb_norm) == list(range(8))
    np.testing.assert_allclose([tb_norm[s] for s in range(8)], oracle.pre, rtol=NORM_RTOL + U32, atol=0)
    np.testing.assert_allclose([scalars["graddoctor/loss"][s] for s in range(8)], expected, rtol=3 * U32, atol=0)
    assert {"graddoctor/grad_norm/net.0", "graddoctor/grad_norm/net.2"} <= set(scalars), sorted(scalars)


def _tb_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


@pytest.mark.slow
def test_every_mirrorable_logger_of_the_trainer_is_mirrored_and_others_skipped(tmp_path, monkeypatch):
    """Loggers [CSVLogger, MLFlowLogger(local file store)]: MLflow gets the scalars, the CSV logger is skipped."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    loggers = [CSVLogger(tmp_path / "csv"), MLFlowLogger(tracking_uri=uri)]
    oracle = NormOracle()
    trainer = _trainer(tmp_path, [oracle, GradDoctorCallback(tmp_path / "gd")], logger=loggers, max_epochs=1)
    _fit(trainer, Tiny())
    # MLflow's file store keeps the global norm as graddoctor/grad_norm/global (see the README's Mirrors)
    history = MlflowClient(uri).get_metric_history(loggers[1].run_id, "graddoctor/grad_norm/global")
    values = dict((m.step, m.value) for m in history)
    np.testing.assert_allclose([values[s] for s in range(8)], oracle.pre, rtol=NORM_RTOL + U32, atol=0)


def test_a_user_mirror_is_added_and_an_unknown_one_refused_at_construction(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path / "mine")
    oracle = NormOracle()
    trainer = _trainer(tmp_path, [oracle, GradDoctorCallback(tmp_path / "gd", mirror=writer)], max_epochs=1)
    _fit(trainer, Tiny())
    writer.close()
    tb_norm = _tb_scalars(tmp_path / "mine")["graddoctor/grad_norm"]
    np.testing.assert_allclose([tb_norm[s] for s in range(8)], oracle.pre, rtol=NORM_RTOL + U32, atol=0)
    with pytest.raises(ConfigError, match="mirror=.*is not allowed"):
        GradDoctorCallback(tmp_path / "gd2", mirror="tensorboard")


def test_an_epochs_shorter_last_accumulation_records_the_mean_of_its_micro_batch_losses(tmp_path):
    """8 batches with accumulate_grad_batches=3: steps of 3, 3 and 2 micro-batches, each loss divided by 3 by
    Lightning; the callback records the mean over the step's own micro-batches."""
    module = Tiny()
    oracle = NormOracle()
    trainer = _trainer(tmp_path, [oracle, GradDoctorCallback(tmp_path / "gd")], max_epochs=1, accumulate_grad_batches=3)
    _fit(trainer, module)
    run = gd.open_run(tmp_path / "gd")
    steps, losses = run.loss()
    assert oracle.steps == len(steps) == 3
    expected = [np.mean(module.losses[0:3]), np.mean(module.losses[3:6]), np.mean(module.losses[6:8])]
    # float32: each loss / 3 rounds, two additions, one multiply by 3/2: at most 4 roundings of the result's size
    np.testing.assert_allclose(losses, expected, rtol=5 * U32, atol=0)
    np.testing.assert_allclose(run.global_norm()[1], oracle.pre, rtol=NORM_RTOL, atol=0)


def test_closes_the_run_on_an_exception_with_the_steps_before_it(tmp_path):
    run_dir = tmp_path / "gd"
    oracle = NormOracle()
    module = Tiny(fail_at_batch=5)  # steps 0 (batches 0-1) and 1 (2-3) complete; batch 4's step never comes
    trainer = _trainer(tmp_path, [oracle, GradDoctorCallback(run_dir)], accumulate_grad_batches=2)
    with pytest.raises(RuntimeError, match="on purpose"):
        _fit(trainer, module)
    run = gd.open_run(run_dir)
    steps, norms = run.global_norm()
    np.testing.assert_array_equal(steps, [0, 1])
    np.testing.assert_allclose(norms, oracle.pre, rtol=NORM_RTOL, atol=0)
    assert run.meta.get("closed_at") is not None
    # the writer's lock is released: the same directory can be recorded again
    gd.watch(nn.Linear(2, 2), run_dir=run_dir, overwrite=True).close()


def test_run_dir_none_lands_in_the_loggers_version_dir(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb", name="exp")
    trainer = _trainer(tmp_path, [GradDoctorCallback()], logger=logger, max_epochs=1)
    _fit(trainer, Tiny())
    run = gd.open_run(Path(logger.log_dir) / "graddoctor")
    assert run.num_steps == 8
    assert Path(logger.log_dir).parent.parent == tmp_path / "tb"


def test_run_dir_none_without_a_logger_lands_in_default_root_dir(tmp_path):
    trainer = _trainer(tmp_path, [GradDoctorCallback()], max_epochs=1, limit_train_batches=2)
    _fit(trainer, Tiny())
    assert gd.open_run(tmp_path / "graddoctor").num_steps == 2


def test_bad_options_are_refused_at_construction():
    with pytest.raises(ConfigError, match="flush_every=0"):
        GradDoctorCallback("runs/x", flush_every=0)
    with pytest.raises(ConfigError, match=r"unknown watch option\(s\) \['flush_evry'\]"):
        GradDoctorCallback("runs/x", flush_evry=10)
    with pytest.raises(ConfigError, match="run_dir=3"):
        GradDoctorCallback(3)


class TwoOptimizers(Tiny):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
        loss = (self(batch[0]) - batch[1]).pow(2).mean()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()


def test_two_optimizers_are_refused_in_one_line(tmp_path):
    module = TwoOptimizers()
    module.automatic_optimization = False
    trainer = _trainer(tmp_path, [GradDoctorCallback(tmp_path / "gd")], max_epochs=1)
    with pytest.raises(ConfigError, match="one optimizer; configure_optimizers returned 2"):
        _fit(trainer, module)
    assert not (tmp_path / "gd").exists()


def test_fsdp1_and_deepspeed_are_refused_with_what_to_use_instead():
    """Lightning's FSDPStrategy needs CUDA (it refuses accelerator='cpu'), so the callback's check is run
    on a real FSDPStrategy object here; setup() makes the same call on every rank before anything trains."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from graddoctor.integrations.lightning import refuse_unsupported_strategy

    with pytest.raises(ConfigError, match="FSDPStrategy.*local shard only.*ModelParallelStrategy"):
        refuse_unsupported_strategy(FSDPStrategy())
    refuse_unsupported_strategy(DDPStrategy())  # allowed


def test_16_mixed_with_a_grad_scaler_records_unscaled_norms_and_losses(tmp_path):
    """Real float16 autocast on the CPU through Lightning's MixedPrecision plugin and a GradScaler (Lightning
    maps precision='16-mixed' on the CPU to bf16; the plugin given explicitly keeps float16 and the scaler)."""
    oracle = NormOracle()
    module = Tiny()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = _trainer(tmp_path, [oracle, GradDoctorCallback(tmp_path / "gd")], plugins=[plugin],
                       accumulate_grad_batches=2, gradient_clip_val=CLIP, max_epochs=1)
    _fit(trainer, module)
    run = gd.open_run(tmp_path / "gd")
    steps, norms = run.global_norm()
    assert oracle.steps == len(steps) == 4
    np.testing.assert_allclose(norms, oracle.pre, rtol=NORM_RTOL, atol=0)  # Lightning unscaled before both saw them
    _, amp = run.amp()
    assert (amp[:, 0] == 2.0 ** 10).all() and (amp[:, 1] == 0).all()  # the scale each step ran at; no overflow
    _, losses = run.loss()
    # the hook's loss is scaled by 2**10 and divided by 2 (both exact), then unscaled exactly: one rounding per sum
    np.testing.assert_allclose(losses, _step_means(module.losses, 2), rtol=2 * U32, atol=0)


def _run_two_ranks(tmp_path, modes):
    """Start both ranks at once, as torchrun would (LOCAL_RANK set: Lightning launches nothing itself), so
    their Lightning imports overlap instead of running one after the other; returns each mode's rank JSONs."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)]),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", NODE_RANK="0")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), ",".join(modes)],
                              env=dict(env, LOCAL_RANK=str(r)), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return {m: [json.loads((tmp_path / m / f"rank{r}.json").read_text()) for r in (0, 1)] for m in modes}


@pytest.mark.slow
def test_two_gloo_processes_rank0_records_the_norms_of_the_averaged_gradients(tmp_path):
    """DDP all-reduces the gradients; FSDP2 (ModelParallelStrategy) reduce-scatters them into DTensor shards,
    whose norms watch combines across ranks. The oracle gathers the full gradients on each rank."""
    results = _run_two_ranks(tmp_path, ["ddp", "fsdp2"])
    for mode, ranks in results.items():
        assert [r["recording"] for r in ranks] == [True, False], mode
        # both ranks see the same averaged gradients
        np.testing.assert_allclose(ranks[1]["pre"], ranks[0]["pre"], rtol=NORM_RTOL, atol=0, err_msg=mode)
        assert all(math.isfinite(v) for v in ranks[0]["pre"])
        stores = sorted(p.parent.name for p in (tmp_path / mode).rglob("*.sqlite"))
        assert stores == ["gd"], (mode, stores)  # rank 0's store, and no other
        run = gd.open_run(tmp_path / mode / "gd")
        steps, norms = run.global_norm()
        assert ranks[0]["steps"] == ranks[0]["global_step"] == len(steps) == 4, mode
        np.testing.assert_allclose(norms, ranks[0]["pre"], rtol=NORM_RTOL, atol=0, err_msg=mode)
        assert run.meta["world_size"] == 2
