"""watch in the situations real training loops put it in."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd


def mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def test_no_host_sync_inside_a_step(tmp_path, monkeypatch):
    # On the meta device every read of a value raises, so a step that completes did not sync.
    # watch refuses a meta-device model with a run_dir (nothing could be written); this proof needs
    # it to record, so the refusal is lifted here and the flush is expected to fail.
    monkeypatch.setattr("graddoctor.core._watch.check_measurable", lambda *a: None)
    model = mlp().to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gd.watch(model, opt, tmp_path, flush_every=1000, activation_every=2, sample_every=2)
    for _ in range(5):
        opt.zero_grad()
        loss = model(torch.randn(4, 6, device="meta")).pow(2).mean()
        loss.backward()
        w.step(loss)
        opt.step()
    assert w.step_index == 5
    with pytest.raises(Exception):
        w.flush()  # the one sync point does read values, and so fails on meta
    w._reset_buffers()  # nothing on meta can be written: drop it, and close the store
    w.close()


def test_frozen_and_unused_parameters(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": mlp(), "extra": nn.Linear(3, 3)})
    model["body"][0].requires_grad_(False)  # frozen: not watched at all
    body, extra = model["body"], model["extra"]  # extra is unused on odd steps: grad None there
    with gd.watch(model, run_dir=tmp_path, activation_every=0) as w:
        for step in range(4):
            model.zero_grad(set_to_none=True)
            out = body(torch.randn(5, 6))
            if step % 2 == 0:
                out = extra(out)
            out.pow(2).mean().backward()
            w.step()
    run = gd.open_run(tmp_path)
    assert "body.0.weight" not in run.tensors and "body.2.weight" in run.tensors
    h = run.tensor_history("extra.weight")
    assert h.grad_nonfinite.tolist() == [0, -1, 0, -1]
    assert np.isnan(h.grad_norm[1]) and h.grad_norm[0] > 0
    _, total = run.global_norm()
    assert np.isfinite(total).all()  # a missing gradient is not a non-finite one


def test_no_trainable_parameter_is_a_clear_error():
    model = mlp().requires_grad_(False)
    with pytest.raises(gd.NoGradientsError, match="Sequential has no parameter with requires_grad=True"):
        gd.watch(model)


def test_unknown_option_and_bad_value_are_clear_errors():
    with pytest.raises(gd.ConfigError, match=r"unknown watch option\(s\) \['flush_evry'\]; allowed"):
        gd.watch(mlp(), flush_evry=3)
    with pytest.raises(gd.ConfigError, match="flush_every=0 is not allowed"):
        gd.watch(mlp(), flush_every=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters(tmp_path, dtype):
    torch.manual_seed(0)
    model = mlp().to(dtype)
    with gd.watch(model, run_dir=tmp_path) as w:
        model(torch.randn(5, 6, dtype=dtype)).float().pow(2).mean().backward()
        w.step()
        expected = [float(torch.linalg.vector_norm(p.grad.float())) for p in model.parameters()]
    run = gd.open_run(tmp_path)
    got = [run.tensor_history(n).grad_norm[0] for n in run.tensors]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert run.meta["modules"]["0"] == "Linear"


def test_gradient_accumulation_records_the_accumulated_gradient(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    xs = [torch.randn(4, 6) for _ in range(3)]
    with gd.watch(model, run_dir=tmp_path) as w:
        for x in xs:  # three micro-batches, one optimizer step
            model(x).pow(2).mean().backward()
        w.step()
        expected = float(torch.linalg.vector_norm(model[0].weight.grad))
    run = gd.open_run(tmp_path)
    assert run.tensor_history("0.weight").grad_norm[0] == pytest.approx(expected, rel=1e-6)
    _, inputs = run.inputs()
    assert inputs[0, 0] == pytest.approx(max(float(x.abs().max()) for x in xs))  # max over micro-batches


def test_a_reused_input_buffer_is_measured_batch_by_batch(tmp_path):
    # Each micro-batch copied into one reused input buffer must count as it was when its forward
    # ran. Measuring the batch later (at step(), to save the hook's cost) would see only the last.
    torch.manual_seed(0)
    model = mlp()
    xs = [torch.randn(4, 6) * s for s in (5.0, 1.0, 0.5)]  # the largest first: the last alone would be wrong
    buf = torch.empty(4, 6)
    with gd.watch(model, run_dir=tmp_path) as w:
        for x in xs:
            buf.copy_(x)
            model(buf).pow(2).mean().backward()
        w.step()
    _, inputs = gd.open_run(tmp_path).inputs()
    assert inputs[0, 0] == pytest.approx(float(xs[0].abs().max()))
    assert inputs[0, 2] == pytest.approx(float(xs[-1].mean()), abs=1e-6)  # mean and std: the last batch's


@pytest.mark.parametrize("give_optimizer", [True, False])  # taken in its step post-hook, or at the next step()
@pytest.mark.parametrize("weight_every", [1, 3])  # 1: every step (the default)
def test_update_and_weight_norms_with_param_groups(tmp_path, stats_path, give_optimizer, weight_every):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 0.01}])
    updates, weights = [], []
    options = {} if weight_every == 1 else {"weight_every": weight_every}
    with gd.watch(model, opt if give_optimizer else None, tmp_path, sample_every=2, **options) as w:
        for step in range(7):
            opt.zero_grad()
            model(torch.randn(5, 6)).pow(2).mean().backward()
            before = [p.detach().clone() for p in model.parameters()]
            w.step()
            opt.step()
            if step % weight_every == 0:
                weights.append([float(torch.linalg.vector_norm(b)) for b in before])
            if step % 2 == 0:
                updates.append([float(torch.linalg.vector_norm(p.detach() - b)) for p, b in zip(model.parameters(), before)])
    run = gd.open_run(tmp_path)
    assert run.meta["lr"] == ([0.1, 0.01] if give_optimizer else None)
    for i, name in enumerate(run.tensors):
        h = run.tensor_history(name)
        assert h.sample_steps.tolist() == list(range(0, 7, weight_every))
        assert h.update_steps.tolist() == [0, 2, 4, 6]
        np.testing.assert_allclose(h.weight_norm, [u[i] for u in weights], rtol=1e-5)
        np.testing.assert_allclose(h.update_norm, [u[i] for u in updates], rtol=1e-4)


def test_evaluation_forwards_are_not_training_batches(tmp_path):
    model = mlp()
    with gd.watch(model, run_dir=tmp_path) as w:
        model(torch.ones(2, 6)).sum().backward()
        with torch.no_grad():
            model(torch.full((2, 6), 1e6))
        w.step()
    _, inputs = gd.open_run(tmp_path).inputs()
    assert inputs[0, 0] == 1.0


@pytest.mark.slow
def test_torch_compile_is_not_broken(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gd.watch(compiled, opt, tmp_path) as w:
        for _ in range(3):
            opt.zero_grad()
            loss = compiled(torch.randn(5, 6)).pow(2).mean()
            loss.backward()
            w.step(loss)
            opt.step()
    run = gd.open_run(tmp_path)
    assert run.tensors[0] == "0.weight"  # names of the module inside the wrapper
    assert run.meta["compiled"] is True and run.activation_modules == []
    assert np.isfinite(run.loss()[1]).all() and len(run.loss()[0]) == 3


def test_step_after_close_is_refused(tmp_path):
    w = gd.watch(mlp(), run_dir=tmp_path)
    w.close()
    w.close()  # twice is fine
    with pytest.raises(RuntimeError, match="after close"):
        w.step()


def test_nan_loss_is_kept(tmp_path):
    model = mlp()
    with gd.watch(model, run_dir=tmp_path) as w:
        model(torch.randn(2, 6)).sum().backward()
        w.step(torch.tensor(float("nan")))
        w.step(float("inf"))
        w.step()
    steps, loss = gd.open_run(tmp_path).loss()
    assert math.isnan(loss[0]) and loss[1] == math.inf
    # step() with no loss records no loss row: missing, not NaN (the step itself is recorded)
    assert steps.tolist() == [0, 1] and gd.open_run(tmp_path).global_norm()[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("offset", [0.0, 300.0])  # 300: pixel-like values far from zero
def test_input_batch_statistics_match_direct_computation(tmp_path, stats_path, offset):
    torch.manual_seed(1)
    model = mlp()
    xs = [torch.randn(64, 6) * 3 + offset for _ in range(3)]
    xs[2][5, 1] = float("nan")
    with gd.watch(model, run_dir=tmp_path) as w:
        for x in xs:
            model(x).nan_to_num().pow(2).mean().backward()
            w.step()
    _, inputs = gd.open_run(tmp_path).inputs()
    for row, x in zip(inputs[:2], xs[:2]):
        d = x.double()
        np.testing.assert_allclose(row, [float(d.abs().max()), 0.0, float(d.mean()), float(d.std())], rtol=1e-5)
    assert math.isnan(inputs[2, 0]) and inputs[2, 1] == 1 and math.isnan(inputs[2, 2])


def test_channels_last_conv_net_matches_a_naive_loop(tmp_path, stats_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(5, 3, 8, 8).to(memory_format=torch.channels_last)
    with gd.watch(model, run_dir=tmp_path) as w:
        model(x).pow(2).mean().backward()
        assert not model[0].weight.grad.is_contiguous()  # the case under test: channels-last gradients
        expected = [(float(p.grad.double().norm()), float(p.grad.double().abs().max())) for p in model.parameters()]
        w.step()
    run = gd.open_run(tmp_path)
    for name, (norm, maxabs) in zip(run.tensors, expected):
        h = run.tensor_history(name)
        assert h.grad_norm[0] == pytest.approx(norm, rel=1e-5) and h.grad_maxabs[0] == pytest.approx(maxabs, rel=1e-6)


def test_weight_every_defaults_to_the_device():
    """Weight norms every step on the CPU (read beside the gradients), every 10th on accelerators, where a
    read of the weights costs as much as the gradients' whole pass; a value given is kept."""
    cpu = gd.watch(nn.Linear(3, 2), run_dir=None)
    meta = gd.watch(nn.Linear(3, 2, device="meta"), run_dir=None)
    given = gd.watch(nn.Linear(3, 2, device="meta"), run_dir=None, weight_every=3)
    assert (cpu.config.weight_every, meta.config.weight_every, given.config.weight_every) == (1, 10, 3)
    for w in (cpu, meta, given):
        w.close()
    with pytest.raises(gd.ConfigError, match="weight_every=0 is not allowed"):
        gd.watch(nn.Linear(3, 2), run_dir=None, weight_every=0)
