"""Gradient transforms against independent oracles: PyTorch's clip functions, naive loops, the papers' formulas."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from _numerics import (
    U32,
    U64,
    clip_coef_rel,
    clipped_grad_rel,
    compose,
    gamma,
    norm_rel,
    rel_diff_tol,
    total_norm_rel,
    unit_roundoff,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import graddoctor as gd
from graddoctor import treat
from graddoctor.core._stats import group_by_device_dtype, tensor_stats

SHAPES = [(3,), (4, 5), (2, 3, 4), (1,), (7, 1), (2, 2, 2, 2), (0,), (16,)]


def make_params(seed: int, dtypes=(torch.float32,), none_every: int = 0, scale: float = 1.0):
    """Parameters of many shapes and dtypes with random gradients; every `none_every`-th has no grad."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(SHAPES * 2):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        if not (none_every and i % none_every == 0):
            p.grad = (torch.randn(shape, generator=g) * scale * (i + 1)).to(dtype)
        params.append(p)
    return params


def clone_grads(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def grads_of(params):
    return [p.grad for p in params if p.grad is not None]


def total_rel(params, u: float = U32) -> float:
    """Bound on a measured global norm of these gradients (any order, either stats path): per-tensor
    norms of up to n entries, then the norm of P norms (_numerics.total_norm_rel)."""
    gs = grads_of(params)
    return total_norm_rel(norm_rel(max(g.numel() for g in gs), u), len(gs), u)


def clip_rtol(params, clips: int = 1) -> float:
    """Two float32 clips of the same gradients (native kernel and PyTorch), each within
    clipped_grad_rel of the exact clip: they differ by at most the sum."""
    e = clipped_grad_rel(total_rel(params), clips)
    return rel_diff_tol(e, e)


def unit_numel(p) -> int:
    """Entries in one AGC unit: a row / filter of a matrix or conv, the whole of a vector."""
    return p.numel() if p.ndim <= 1 else p[0].numel()


def agc_rel(p) -> float:
    """AGC in float32 against the float64 loop: ||W_i|| and ||G_i|| (norm_rel each), x lambda (the float32
    lambda and the product), the ratio, the product with G: four roundings; then the loop's result is
    rounded to float32 once. A unit near the threshold clipped by one and not the other differs by
    |1 - max_norm / ||G||| <= the norms' error, so the bound covers it."""
    k = unit_numel(p)
    ours = compose(norm_rel(k), norm_rel(k), U32, U32, U32, U32)
    return rel_diff_tol(ours, compose(U32, norm_rel(k, U64, out_u=U64)))


def run_guard(transform, params):
    guard = treat.Guard(transform, params)
    guard.step()
    return guard


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("none_every", [0, 3])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_clip_norm_equals_torch_float32(seed, none_every, scale, stats_path):
    params = make_params(seed, none_every=none_every, scale=scale)
    ref = clone_grads(params)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    run_guard(gd.clip_norm(1.0), params)
    for p, r in zip(params, ref):
        assert (p.grad is None) == (r.grad is None)
        if p.grad is None:
            continue
        if stats_path == "torch":  # PyTorch's own norm ops: bit for bit
            assert torch.equal(p.grad, r.grad)
        else:  # the native kernel's norm differs from PyTorch's in rounding only
            torch.testing.assert_close(p.grad, r.grad, rtol=clip_rtol(ref), atol=0)


def test_group_by_device_dtype_partitions_the_present_tensors():
    params = make_params(3, dtypes=(torch.float32, torch.float64, torch.bfloat16), none_every=4)
    grads = [p.grad for p in params]
    groups = group_by_device_dtype(grads)
    # oracle: every present tensor exactly once, in the group of its own (device, dtype), ascending
    assert sorted(i for idx in groups.values() for i in idx) == [i for i, g in enumerate(grads) if g is not None]
    for (device, dtype), idx in groups.items():
        assert idx == sorted(idx) and all(grads[i].device == device and grads[i].dtype == dtype for i in idx)
    assert list(groups) == list(dict.fromkeys((g.device, g.dtype) for g in grads if g is not None))
    assert group_by_device_dtype([None, None]) == {}


@pytest.mark.parametrize("dtypes", [(torch.float64,), (torch.float16, torch.float32), (torch.bfloat16, torch.float64)])
def test_clip_norm_matches_torch_other_dtypes(dtypes):
    params = make_params(1, dtypes=dtypes, none_every=4, scale=10.0)
    ref = clone_grads(params)
    torch.nn.utils.clip_grad_norm_(ref, 2.0)
    run_guard(gd.clip_norm(2.0), params)
    # PyTorch forms each norm in its gradient's dtype (half types accumulate in float32 and round the
    # norm to the dtype), and the total and coefficient in (at worst) the least precise dtype of the set;
    # graddoctor forms them in float32. Each product is rounded to the gradient's dtype on both sides.
    gs = grads_of(ref)
    n, count, low = max(g.numel() for g in gs), len(gs), max(unit_roundoff(d) for d in dtypes)
    acc = {d: U64 if d == torch.float64 else U32 for d in dtypes}
    per_tensor = max(norm_rel(n, acc[d], out_u=unit_roundoff(d)) for d in dtypes)
    theirs = clip_coef_rel(total_norm_rel(per_tensor, count, low), low)
    ours = clip_coef_rel(total_norm_rel(norm_rel(n, U32), count))
    rtol = rel_diff_tol(theirs, ours) + 2 * low
    atol = 2.0 ** -25 if torch.float16 in dtypes else 0.0  # float16 products below 2^-14 are subnormal: 2^-24 apart
    for p, r in zip(params, ref):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64, torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("clip", [0.01, 0.5, 3.0])
def test_clip_value_equals_torch(dtypes, clip):
    params = make_params(2, dtypes=dtypes, none_every=3)
    ref = clone_grads(params)
    torch.nn.utils.clip_grad_value_(ref, clip)
    guard = run_guard(gd.clip_value(clip), params)
    for p, r in zip(params, ref):
        if p.grad is not None:
            assert torch.equal(p.grad, r.grad)
    expected = sum(1 for r in clone_grads(make_params(2, dtypes=dtypes, none_every=3))
                   if r.grad is not None and r.grad.numel() and r.grad.abs().max().item() > clip)
    assert guard.report()["clip_value.clipped"].item() == expected


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 50.0])
def test_clip_per_tensor_equals_naive_loop(seed, max_norm, stats_path):
    params = make_params(seed, none_every=5, scale=3.0)
    ref = clone_grads(params)
    for r in ref:  # the oracle: PyTorch's own clip, one variable at a time
        if r.grad is not None:
            torch.nn.utils.clip_grad_norm_([r], max_norm)
    run_guard(gd.clip_norm_per_tensor(max_norm), params)
    for p, r in zip(params, ref):
        if p.grad is None:
            continue
        if stats_path == "torch":
            assert torch.equal(p.grad, r.grad)
        else:  # the native kernel's norms differ from PyTorch's in rounding only (each tensor's own norm)
            e = clipped_grad_rel(norm_rel(p.grad.numel()))
            torch.testing.assert_close(p.grad, r.grad, rtol=rel_diff_tol(e, e), atol=0)


def _total_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), max_norm=st.floats(1e-3, 1e3), scale=st.floats(1e-4, 1e4))
def test_property_clip_norm_bound_and_idempotent(seed, max_norm, scale):
    params = make_params(seed, none_every=4, scale=scale)
    t_rel = total_rel(params)
    e = clipped_grad_rel(t_rel)
    run_guard(gd.clip_norm(max_norm), params)
    # the clipped total is max_norm * total / (total + 1e-6) <= max_norm, up to the clip's rounding e
    # (and the float64 check's own gamma_n)
    n_all = sum(g.numel() for g in grads_of(params))
    assert _total_norm(params) <= max_norm * (1 + e) * (1 + gamma(n_all, U64))
    once = [p.grad.clone() for p in params if p.grad is not None]
    run_guard(gd.clip_norm(max_norm), params)
    # A second clip measures a total <= max_norm (1 + e)(1 + t_rel) and scales by
    # max_norm / (that + 1e-6) within 4 roundings (clip_coef_rel), or not at all: it shrinks by at most
    # 1 - (1 - 4u) / ((1 + e)(1 + t_rel) + 1e-6 / max_norm), PyTorch's +1e-6 included; the multiply rounds once.
    rtol = 1 - (1 - 4 * U32) / ((1 + e) * (1 + t_rel) + 1e-6 / max_norm) + U32
    for a, p in zip(once, [p for p in params if p.grad is not None]):
        torch.testing.assert_close(p.grad, a, rtol=rtol, atol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), clip=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 1e3))
def test_property_clip_value_and_per_tensor(seed, clip, scale):
    params = make_params(seed, none_every=3, scale=scale)
    run_guard(gd.clip_value(clip), params)
    assert all(p.grad.abs().max() <= clip for p in params if p.grad is not None and p.grad.numel())
    once = [p.grad.clone() for p in params if p.grad is not None]
    run_guard(gd.clip_value(clip), params)
    assert all(torch.equal(a, p.grad) for a, p in zip(once, [p for p in params if p.grad is not None]))
    run_guard(gd.clip_norm_per_tensor(clip), params)
    for p in params:
        if p.grad is not None:  # within the clip's rounding of its own norm (and the float64 check's gamma_n)
            n = p.grad.numel()
            assert float(p.grad.double().norm()) <= clip * (1 + clipped_grad_rel(norm_rel(n))) * (1 + gamma(n, U64))


def naive_agc(params, clipping, eps, skip):
    """Brock et al. 2021, unit by unit, with Python loops."""
    for i, p in enumerate(params):
        if p.grad is None or i in skip:
            continue
        g, w = p.grad.double(), p.detach().double()
        rows = [(g, w)] if p.ndim <= 1 else [(g[j], w[j]) for j in range(p.shape[0])]
        out = []
        for gu, wu in rows:
            max_norm = max(math.sqrt(float((wu ** 2).sum())), eps) * clipping
            gn = math.sqrt(float((gu ** 2).sum()))
            out.append(gu * (max_norm / max(gn, 1e-6)) if gn > max_norm else gu)
        p.grad = (out[0] if p.ndim <= 1 else torch.stack(out)).to(p.dtype)


@pytest.mark.parametrize("clipping", [0.001, 0.01, 0.5])
def test_agc_equals_naive_unitwise_loop(clipping):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 5),
                                torch.nn.ReLU(), torch.nn.Linear(5, 4))
    torch.manual_seed(0)
    with torch.no_grad():
        model[2].weight[1].zero_()  # a zero row: the eps floor decides its threshold
    loss = model(torch.randn(8, 2, 4, 4)).pow(2).sum() * 10
    loss.backward()
    named = list(model.named_parameters())
    ref = clone_grads([p for _, p in named])
    final = {i for i, (n, _) in enumerate(named) if n.startswith("4.")}
    naive_agc(ref, clipping, 1e-3, final)
    guard = treat.Guard(gd.agc(clipping), named)
    guard.step()
    for (_, p), r in zip(named, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=agc_rel(p), atol=0)
    assert guard.state.skip == tuple(sorted(final))


def scripted_run(transform, norms):
    """Feed a scripted sequence of global norms (one 10-vector gradient) and return the clipped norms."""
    p = torch.nn.Parameter(torch.zeros(10))
    u = torch.ones(10, dtype=torch.float64) / math.sqrt(10)
    guard = treat.Guard(transform, [p])
    out = []
    for n in norms:
        p.grad = (u * n).float()
        guard.step()
        out.append(float(p.grad.double().norm()))
    return out, guard


def norm_sequence(seed=0, n=60):
    rng = np.random.default_rng(seed)
    seq = list(np.abs(rng.normal(1.0, 0.2, n)))
    for i in (30, 31, 45):
        seq[i] = seq[i] * 40.0  # spikes
    return [float(x) for x in seq]


@pytest.mark.parametrize("percentile,history_size", [(10, None), (50, None), (90, 7), (10, 300)])
def test_auto_clip_follows_paper(percentile, history_size):
    norms = norm_sequence(1, 300) if history_size == 300 else norm_sequence(1)
    got, _ = scripted_run(gd.auto_clip(percentile, history_size), norms)
    # Each norm is measured on a float32 gradient of 10 entries (cast: u, then total_rel); the threshold
    # interpolates two of them in float32 (3 roundings of the larger) at a rank q (count - 1) formed in
    # float32 (off by <= 2u rank, which moves the threshold by that times the gap between neighbours);
    # the coefficient adds the measured norm's error and 3 roundings; the product and the cast 1 each.
    e_norm = compose(U32, total_norm_rel(norm_rel(10), 1))
    history = []
    for n, g in zip(norms, got):
        history.append(n)  # appended before the percentile is taken
        window = history if history_size is None else history[-history_size:]
        threshold = float(np.percentile(window, percentile))
        expected = n * min(1.0, threshold / (n + 1e-6))
        srt, rank = np.sort(window), percentile / 100 * (len(window) - 1)
        i = int(rank)
        gap = max(np.diff(srt[max(i - 1, 0):i + 3]), default=0.0)
        e_thr = (e_norm + 3 * U32) * srt[min(i + 1, len(srt) - 1)] + 2 * U32 * rank * gap
        rel = compose(U32, e_thr / threshold, e_norm, 3 * U32, U32, gamma(10, U64))
        assert abs(g - expected) <= rel * expected


def zclip_oracle(norms, alpha, zt, warmup, eps=1e-6):
    """ZClip (Kumar et al. 2025), adaptive scaling, in plain floats.

    Returns the clipped norms and, for each, a first-order bound on how far graddoctor's float32
    run may be from it (a running error analysis: each quantity carries an absolute error bound e_*,
    propagated through the same formulas, every float32 operation adding u of its result; the
    float64 oracle's own error is ~1e-16 relative and left out). Where z is within its error of the
    threshold either branch may be taken; the clipped norm is continuous there, so the other branch's
    value is within |g* - g| and that is added.
    """
    u = U32
    e_meas = compose(U32, total_norm_rel(norm_rel(10), 1))  # a measured norm: cast to float32, then measured
    e_out_plain = compose(U32, gamma(10, U64))  # an unclipped output: the cast only (and the float64 check)
    out, bound, buf, mu, var = [], [], [], None, None
    for g in norms:
        eg = e_meas * g
        if mu is None:
            buf.append(g)
            out.append(g)
            bound.append(e_out_plain * g)
            if len(buf) == warmup:
                w = len(buf)
                mu = sum(buf) / w
                e_mu = compose(e_meas, gamma(w - 1), u) * mu
                ds = [x - mu for x in buf]
                var = sum(d * d for d in ds) / w
                e_var = sum(2 * abs(d) * (e_meas * x + e_mu + u * abs(d)) + u * d * d for d, x in zip(ds, buf)) / w \
                    + compose(gamma(w - 1), u) * var
            continue
        std = math.sqrt(var)
        e_std = (e_var / (2 * std) if std > 0 else math.sqrt(e_var)) + u * std
        den = std + eps
        z = (g - mu) / den
        e_z = (eg + e_mu + u * abs(g - mu) + abs(z) * (e_std + u * den)) / den + u * abs(z)
        if z > 0:  # the clipped branch (only z > zt takes it)
            g_clip = mu + (zt * std) / (z / zt)
            e_clip = e_mu + zt * zt * (e_std / z + std * e_z / (z * z)) + 4 * u * abs(g_clip)
            c_clip = min(1.0, g_clip / (g + 1e-6))
            e_c_clip = c_clip * (e_clip / abs(g_clip) + e_meas + 2 * u)
        else:
            g_clip, e_clip, c_clip, e_c_clip = g, eg, 1.0, 0.0
        if z > zt:
            g_star, e_star, coef, e_coef = g_clip, e_clip, c_clip, e_c_clip
        else:
            g_star, e_star, coef, e_coef = g, eg, 1.0, 0.0
        if abs(z - zt) <= e_z:  # either branch may be taken: the larger error, plus the distance between them
            e_star = max(e_clip, eg) + abs(g_clip - g)
            e_coef = e_c_clip + abs(c_clip - 1.0)
        out.append(g * coef)
        bound.append(e_out_plain * g * coef + g * e_coef * (1 + U32) + U32 * g * coef)
        new_mu = alpha * mu + (1 - alpha) * g_star
        e_new_mu = alpha * e_mu + (1 - alpha) * e_star + 2 * u * (alpha * mu + (1 - alpha) * g_star) + u * new_mu
        d = g_star - new_mu
        e_d = e_star + e_new_mu + u * abs(d)
        new_var = alpha * var + (1 - alpha) * d * d
        e_var = (alpha * e_var + (1 - alpha) * 2 * abs(d) * e_d + 2 * u * (alpha * var + (1 - alpha) * d * d)
                 + u * new_var)
        mu, e_mu, var = new_mu, e_new_mu, new_var
    return out, bound


@pytest.mark.parametrize("alpha,zt,warmup", [(0.97, 2.5, 25), (0.9, 1.5, 5), (0.99, 3.0, 10)])
def test_zclip_follows_paper(alpha, zt, warmup):
    norms = norm_sequence(2)
    got, _ = scripted_run(gd.zclip(alpha, zt, warmup), norms)
    expected, bound = zclip_oracle(norms, alpha, zt, warmup)
    assert (np.abs(np.array(got) - expected) <= bound).all()
    assert got[30] < norms[30] / 5  # the spike was clipped hard


def test_zclip_ignores_nonfinite_norm():
    norms = norm_sequence(3)
    norms[40] = math.nan
    _, guard = scripted_run(gd.zclip(warmup=5), norms)
    assert torch.isfinite(guard.state.mean) and torch.isfinite(guard.state.var)
    finite = [n for i, n in enumerate(norms) if i != 40]
    _, ref = scripted_run(gd.zclip(warmup=5), finite)
    assert torch.equal(guard.state.mean, ref.state.mean)  # the NaN step changed nothing: the same ops on the same norms


ALL = {
    "clip_value": lambda: gd.clip_value(0.05), "clip_norm": lambda: gd.clip_norm(0.5),
    "per_tensor": lambda: gd.clip_norm_per_tensor(0.3), "auto_clip": lambda: gd.auto_clip(20, 4),
    "auto_clip_grow": lambda: gd.auto_clip(20), "agc": lambda: gd.agc(0.01), "zclip": lambda: gd.zclip(warmup=3),
    "skip": lambda: gd.skip_nonfinite(3),
    "chain": lambda: gd.chain(gd.skip_nonfinite(), gd.zclip(warmup=3), gd.clip_norm(0.5)),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_state_round_trip(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    named = list(model.named_parameters())

    def feed(guard, steps, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(steps):
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=g) * 3
            guard.step()
            out.append([p.grad.clone() for _, p in named])
        return out

    a = treat.Guard(ALL[name](), named)
    feed(a, 5, 1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = treat.Guard(ALL[name](), named)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert_state_equal(a.state.state_dict(), b.state.state_dict())
    for ga, gb in zip(feed(a, 6, 2), feed(b, 6, 2)):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def assert_state_equal(x, y):
    if isinstance(x, torch.Tensor):
        assert torch.equal(x.nan_to_num(123.0), y.nan_to_num(123.0))
    elif isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            assert_state_equal(x[k], y[k])
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for a, b in zip(x, y):
            assert_state_equal(a, b)
    else:
        assert x == y


def test_load_state_dict_rejects_wrong_keys():
    guard = treat.Guard(gd.zclip(), [torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(treat.TransformStateError, match="expected exactly"):
        guard.state.load_state_dict({"mean": torch.zeros(())})


def test_stats_are_reused_not_recomputed():
    """The transform scales with the statistics it is given (not a second pass over the grads)."""
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    stats = tensor_stats([p.grad * 10], torch.device("cpu"))  # statistics of a 10x larger gradient
    guard = treat.Guard(gd.clip_norm(1.0), [p])
    guard.apply(stats)
    # 10 x ones(4) has norm 20 exactly; the float32 coefficient 1 / (20 + 1e-6) is clip_coef_rel(0)
    # (4 roundings) from the exact one, the product 1 x coef is exact, and the float64 value below is
    # rounded to float32 once
    torch.testing.assert_close(p.grad, torch.full((4,), 1.0 / (20 + 1e-6)), rtol=clip_coef_rel(0.0) + U32, atol=0)


def test_bad_arguments_raise_config_error():
    for make in (lambda: gd.clip_norm(-1), lambda: gd.clip_value(0), lambda: gd.auto_clip(0),
                 lambda: gd.zclip(alpha=1.0), lambda: gd.agc(clipping=float("nan")), lambda: gd.skip_nonfinite(-2)):
        with pytest.raises(gd.ConfigError, match="not allowed"):
            make()
    with pytest.raises(gd.GradDoctorError):
        gd.chain()


def _torch_per_tensor(params, max_norm):
    for p in params:
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_([p], max_norm)


CHAINS = {  # chain of graddoctor transforms, and the same clips applied one after the other by PyTorch
    "value_then_norm": (lambda: gd.chain(gd.clip_value(0.5), gd.clip_norm(1.0)),
                        lambda ps: (torch.nn.utils.clip_grad_value_(ps, 0.5), torch.nn.utils.clip_grad_norm_(ps, 1.0))),
    "norm_then_norm": (lambda: gd.chain(gd.clip_norm(5.0), gd.clip_norm(1.0)),
                       lambda ps: (torch.nn.utils.clip_grad_norm_(ps, 5.0), torch.nn.utils.clip_grad_norm_(ps, 1.0))),
    "per_tensor_then_norm": (lambda: gd.chain(gd.clip_norm_per_tensor(2.0), gd.clip_norm(1.0)),
                             lambda ps: (_torch_per_tensor(ps, 2.0), torch.nn.utils.clip_grad_norm_(ps, 1.0))),
    "skip_norm_value": (lambda: gd.chain(gd.skip_nonfinite(), gd.clip_norm(3.0), gd.clip_value(0.2)),
                        lambda ps: (torch.nn.utils.clip_grad_norm_(ps, 3.0), torch.nn.utils.clip_grad_value_(ps, 0.2))),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chain_equals_clips_applied_one_after_another(name):
    """Each transform in a chain sees the statistics of the gradients it receives."""
    make, oracle = CHAINS[name]
    params = make_params(5, none_every=4, scale=20.0)
    ref = clone_grads(params)
    oracle([r for r in ref if r.grad is not None])
    run_guard(make(), params)
    # at most two norm clips in a row on either side (clip_value is exact, and 1-Lipschitz after a clip)
    rtol = clip_rtol(ref, clips=2)
    for p, r in zip(params, ref):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, rtol=rtol, atol=0)


def test_chain_agc_then_norm_measures_again():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    (model(torch.randn(16, 6)).pow(2).sum() * 50).backward()
    named = list(model.named_parameters())
    ref = clone_grads([p for _, p in named])
    naive_agc(ref, 0.05, 1e-3, {2, 3})
    torch.nn.utils.clip_grad_norm_(ref, 0.1)
    treat.Guard(gd.chain(gd.agc(0.05), gd.clip_norm(0.1)), named).step()
    # AGC's bound, then a norm clip whose total carries it (the loop's side is float64 until the clip)
    e_agc = max(agc_rel(p) for _, p in named)
    t_rel = total_rel([p for _, p in named])
    ours = compose(e_agc, clip_coef_rel(compose(t_rel, e_agc)), U32)
    theirs = compose(U32, clip_coef_rel(compose(t_rel, U32)), U32)  # the loop's float64 result, cast, then clipped
    rtol = rel_diff_tol(ours, theirs)
    for (_, p), r in zip(named, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=rtol, atol=0)


def test_clip_norm_on_cpu_skips_the_multiply_when_nothing_is_clipped():
    # PyTorch multiplies by a coefficient of 1 (no branch, for accelerators); on the CPU the
    # coefficient is in host memory, so graddoctor skips that pass: same values, no write.
    params = make_params(5, scale=0.01)
    ref = clone_grads(params)
    torch.nn.utils.clip_grad_norm_(ref, 1e3)
    versions = [p.grad._version for p in params]
    run_guard(gd.clip_norm(1e3), params)
    assert [p.grad._version for p in params] == versions  # not written at all
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(params, ref))
    run_guard(gd.clip_norm(1e-3), params)  # a real clip still writes every gradient
    assert all(p.grad._version > v for p, v in zip(params, versions) if p.grad.numel())
