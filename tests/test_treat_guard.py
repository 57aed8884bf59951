"""Guard: skip_nonfinite leaves a NaN step without a trace; watch(guard=...) clips and records."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _numerics import (
    U32,
    U64,
    adam_step_gain,
    clip_coef_rel,
    clipped_grad_rel,
    gamma,
    norm_rel,
    rel_diff_tol,
    total_norm_rel,
)
from torch import nn

import graddoctor as gd
from graddoctor import treat


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(step, n=32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def total_rel(model) -> float:
    """Bound on a measured global gradient norm of `model` (either stats path, any order)."""
    ps = list(model.parameters())
    return total_norm_rel(norm_rel(max(p.numel() for p in ps)), len(ps))


def clip_rtol(model) -> float:
    """A float32 norm clip by the native kernel's total against PyTorch's: each within its bound."""
    e = clipped_grad_rel(total_rel(model))
    return rel_diff_tol(e, e)


def trajectory_atol(update_bound: list[float], r: float) -> float:
    """First-order bound on |p_a - p_b| after training twice from the same weights on the same batches,
    where each step's update differs by at most r x `update_bound[t]` (the clip coefficients differ
    by r; the optimizer's own arithmetic, ~10 roundings of the update on either side, adds
    2 gamma_10). The feedback of a parameter difference into the next gradient (H dp) is second order
    over these few small steps and left out; the p - step rounding on either side is the rtol, 2 u per step."""
    return sum(b * (r + 2 * gamma(10)) for b in update_bound)


def opt_state_copy(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same_opt_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop])
def test_nan_step_leaves_params_and_optimizer_state_bit_identical(opt_cls):
    model = small_model()
    kw = {"momentum": 0.9, "weight_decay": 1e-3} if opt_cls is torch.optim.SGD else {"weight_decay": 1e-3}
    opt = opt_cls(model.parameters(), lr=1e-2, **kw)
    with gd.watch(model, opt, guard=gd.skip_nonfinite()) as w:
        for step in range(5):  # build optimizer state first
            x, y = batch(step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()
        params_before = [p.detach().clone() for p in model.parameters()]
        state_before = opt_state_copy(opt)
        x, y = batch(99)
        x[3, 2] = float("nan")
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
        assert w.guard.skipped
        assert all(torch.equal(a, p) for a, p in zip(params_before, model.parameters()))
        assert_same_opt_state(state_before, opt.state_dict())
        x, y = batch(6)  # and training goes on
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
        assert not w.guard.skipped
        assert not all(torch.equal(a, p) for a, p in zip(params_before, model.parameters()))


def test_too_many_nonfinite_steps_raise_naming_layers():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = treat.Guard(gd.skip_nonfinite(max_consecutive=2), model.named_parameters()).attach(opt)
    for step in range(2):
        model.zero_grad()
        model(torch.full((4, 6), float("inf"))).sum().backward()
        opt.step()
    assert guard.skipped_total == 2
    model.zero_grad()
    model(torch.full((4, 6), float("inf"))).sum().backward()
    with pytest.raises(treat.NonFiniteGradientError, match=r"3 optimizer steps in a row.*0\.weight"):
        opt.step()


def test_guard_attached_to_optimizer_equals_clip_grad_norm_training(stats_path):
    """A pre-hook guard with clip_norm trains exactly as clip_grad_norm_ before each step does."""
    a, b = small_model(1), small_model(1)
    opt_a, opt_b = torch.optim.Adam(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), 1e-2)
    treat.Guard(gd.clip_norm(0.3), a.named_parameters()).attach(opt_a)
    for step in range(10):
        x, y = batch(step)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            if m is b:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.3)
            opt.step()
    if stats_path == "torch":  # PyTorch's own norm ops: bit for bit
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    else:  # the native kernel's norms differ from PyTorch's in rounding only
        # Adam's step lr m_hat / (sqrt(v_hat) + eps) moves by <= 2 r lr K_t when every gradient moves by r
        atol = trajectory_atol([2 * 1e-2 * k for k in adam_step_gain(10)], clip_rtol(a))
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=2 * 10 * U32, atol=atol)


def test_watch_guard_records_interventions_and_raw_stats(tmp_path, stats_path):
    model, ref = small_model(2), small_model(2)
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    guard = gd.chain(gd.skip_nonfinite(), gd.clip_norm(0.05))
    raw_norms = []  # PyTorch's total norm of the watched model's own gradients, before the guard clips them
    with gd.watch(model, opt, tmp_path / "run", guard=guard, flush_every=4) as w:
        for step in range(10):
            x, y = batch(step)
            if step == 6:
                x[0, 0] = float("inf")
            for m, o in ((model, opt), (ref, opt_ref)):
                o.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
            if step != 6:
                raw_norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
                opt_ref.step()
            w.step()
            opt.step()
    if stats_path == "torch":  # PyTorch's own norm ops: the same weights bit for bit
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    else:  # the native kernel's norms differ from PyTorch's in rounding only
        # an SGD step lr c g of a clipped gradient is <= lr max_norm (1 + e) per entry; r of it moves
        e = clipped_grad_rel(total_rel(model))
        atol = trajectory_atol([0.1 * 0.05 * (1 + e)] * 9, clip_rtol(model))
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=2 * 10 * U32, atol=atol)
    # the same gradients measured by the store and by PyTorch: equal on the PyTorch path (the same ops),
    # each within the float32 bound of the exact total on the native one
    t_rel = 0.0 if stats_path == "torch" else rel_diff_tol(total_rel(model), total_rel(model))
    run = gd.open_run(tmp_path / "run")
    steps, norms = run.global_norm()
    finite = [float(n) for s, n in zip(steps, norms) if s != 6]
    # the store keeps the gradients as backward made them
    assert all(abs(f - n) <= t_rel * n for f, n in zip(finite, raw_norms))
    # the guard's float32 coefficient from its total (t_rel from PyTorch's): 3 roundings, against the formula in float64
    c_rel = clip_coef_rel(t_rel) + gamma(3, U64)
    guard_events = run.events("guard")
    assert [e["step"] for e in guard_events] == [s for s in range(10) if s != 6]
    for e, n in zip(guard_events, raw_norms):
        want = min(1.0, 0.05 / (n + 1e-6))
        assert abs(e["data"]["clip_norm.coef"] - want) <= c_rel * want
    skipped = run.events("skipped_step")
    assert [e["step"] for e in skipped] == [6] and skipped[0]["data"]["bad"][0] == "0.weight"
    summary = {i["what"]: i for i in treat.interventions(run)}
    clipped = [n for n in raw_norms if 0.05 / (n + 1e-6) < 1]
    assert summary["clip_norm.coef"]["steps"] == len(clipped)
    want = 0.05 / (max(clipped) + 1e-6)
    assert abs(summary["clip_norm.coef"]["extreme"] - want) <= c_rel * want
    assert summary["skipped_step"]["first_step"] == 6 and "0.weight" in summary["skipped_step"]["detail"]
    assert "skipped_step: 1 step(s)" in treat.format_interventions(run)


def test_watch_rejects_a_guard_that_is_not_a_transform():
    with pytest.raises(gd.GradDoctorError, match="GradientTransform"):
        gd.watch(small_model(), guard=torch.nn.utils.clip_grad_norm_)


def test_watch_accepts_a_guard_only_for_its_own_parameters():
    model = small_model()
    ready = treat.Guard(gd.clip_norm(1.0), model.named_parameters())
    with gd.watch(model, guard=ready) as w:
        assert w.guard is ready
    with pytest.raises(gd.GradDoctorError, match="not the watched model"):
        gd.watch(model, guard=treat.Guard(gd.clip_norm(1.0), small_model(1).parameters()))


@pytest.mark.parametrize("max_norm", [1e-3, 1e3, 0.4])  # clips every step, never, some steps
def test_weight_norms_under_a_clipping_guard_are_the_weights_of_each_step(tmp_path, stats_path, max_norm):
    # On the CPU the weights are read beside the gradients, and the guard then scales the
    # gradients in place; the stored norms must be those of the weights each step's
    # gradients were computed with, whether the step was clipped or not.
    model = small_model(4)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    want, clipped = [], 0
    with gd.watch(model, opt, tmp_path, guard=gd.clip_norm(max_norm), sample_every=3) as w:
        for step in range(8):
            x, y = batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            want.append([float(torch.linalg.vector_norm(p.detach().double())) for p in model.parameters()])
            total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            clipped += bool(total > max_norm)
            w.step()
            opt.step()
    assert 0 < clipped < 8 if max_norm == 0.4 else clipped == {1e-3: 8, 1e3: 0}[max_norm]
    run = gd.open_run(tmp_path)
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    for i, name in enumerate(run.tensors):
        h = run.tensor_history(name)
        assert h.sample_steps.tolist() == list(range(8))
        n = sizes[name]  # a float32 norm of n entries (either path) against the float64 one
        rtol = rel_diff_tol(norm_rel(n), norm_rel(n, U64, out_u=U64))
        np.testing.assert_allclose(h.weight_norm, [u[i] for u in want], rtol=rtol, atol=0)
