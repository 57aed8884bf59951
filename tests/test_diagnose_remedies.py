"""Every remedy of the catalogue: its snippet runs against graddoctor's real API on a small real model and
does what the remedy says, checked against an independent oracle (PyTorch, a formula, a naive loop).

`CHECKS` holds one check per remedy id; the test is parametrized over the catalogue, so a remedy added
without a check fails. Tolerances: float32 rounding bounds from `_numerics` where the result is computed
(clips, penalties, normalizations), statistical margins of 4 standard errors where it is random (init).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
from _numerics import (
    U32,
    clip_coef_rel,
    clipped_grad_rel,
    compose,
    gamma,
    norm_rel,
    orthogonality_bound,
    total_norm_rel,
)
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import graddoctor as gd
from graddoctor.core._layers import Residual
from graddoctor.diagnosis import CATALOGUE, Finding, Remedy, findings_document, remedy

RECURRENT_IDS = ("rnn_to_lstm", "rnn_to_gru", "truncated_bptt", "orthogonal_init")


class _RNNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _mlp(act: type[nn.Module] = nn.Sigmoid, widths=(4, 8, 8, 2)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i + 2 < len(widths) else [])
    return nn.Sequential(*layers)


def _model(remedy_id: str) -> nn.Module:
    if remedy_id in RECURRENT_IDS:
        return _RNNNet()
    if remedy_id == "he_init":  # the activation He init is for, wide enough for a statistical check
        return _mlp(nn.ReLU, (64, 256, 256, 8))
    if remedy_id == "xavier_init":
        return _mlp(nn.Tanh, (64, 256, 256, 8))
    if remedy_id == "zero_residual_init":  # residual branches, trained away from zero
        model, _ = gd.surgery.add_residual(_mlp())
        for m in model.modules():
            if isinstance(m, Residual):
                nn.init.normal_(m.branch[-1].weight)
                nn.init.normal_(m.branch[-1].bias)
        return model
    if remedy_id == "gpt2_init":  # a transformer wide enough for a statistical check of each weight's std
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0), 2,
                                     enable_nested_tensor=False)
    if remedy_id == "pre_layer_norm":  # post-LN transformer layers (x of shape [16, 4]: one unbatched sequence)
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 1, 8, dropout=0.0), 2, enable_nested_tensor=False)
    return _mlp()


def _namespace(remedy_id: str, tmp_path) -> dict:
    torch.manual_seed(0)
    model = _model(remedy_id)
    recurrent = remedy_id in RECURRENT_IDS
    in_features = 64 if remedy_id in ("he_init", "xavier_init", "gpt2_init") else 4
    x = torch.randn(4, 5, 3) if recurrent else torch.randn(16, in_features)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dict(gd=gd, nn=nn, torch=torch, model=model, opt=opt, run_dir=tmp_path / "run", x=x, x_batch=x,
                x_train=torch.randn(64, 4), loss=model(x).pow(2).mean(),
                rnn=model.rnn if recurrent else None, seq=torch.randn(2, 70, 3, requires_grad=True),
                h=torch.zeros(1, 2, 8), DataLoader=DataLoader, dataset=TensorDataset(torch.randn(16, 4)),
                batch_size=8, depth=4, make_model=lambda depth: nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)]))


class Before:
    """What the namespace held before the snippet ran."""

    def __init__(self, ns: dict):
        self.model = ns["model"]
        self.params = [p.detach().clone() for p in ns["model"].parameters()]
        self.modules = list(ns["model"].modules())
        self.out = ns["model"](ns["x"]).detach()
        self.loss = ns["loss"].detach().clone()
        self.lr = ns["opt"].param_groups[0]["lr"]
        self.x = ns["x"].clone()


CHECKS: dict[str, Callable[[dict, Before], None]] = {}


def check(*ids: str):
    def register(fn):
        for i in ids:
            CHECKS[i] = fn
        return fn
    return register


@pytest.mark.parametrize("remedy_id", list(CATALOGUE))
def test_snippet_runs(remedy_id, tmp_path):
    assert remedy_id in CHECKS, f"remedy {remedy_id!r} has no check of its effect: add one to CHECKS"
    ns = _namespace(remedy_id, tmp_path)
    if remedy_id == "sanitize_inputs":  # the data problem this remedy is for
        ns["x"][0, :4] = torch.tensor([math.nan, math.inf, -math.inf, 1e6])
    before = Before(ns)
    snippet = remedy(remedy_id, act="nn.Sigmoid" if not isinstance(before.model, _RNNNet) else "nn.Tanh").snippet
    exec(compile(snippet, f"<remedy {remedy_id}>", "exec"), ns)
    try:
        assert isinstance(ns["model"], nn.Module)  # the snippet leaves a model to keep training
        CHECKS[remedy_id](ns, before)
    finally:
        if isinstance(ns.get("w"), gd.Watch):
            ns["w"].close()


def test_every_check_is_a_catalogue_remedy():
    assert set(CHECKS) == set(CATALOGUE)


# ------------------------------------------------------------------ guards: run steps through the snippet's watch
def _flat_norm(ts) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in ts))


def _guarded_steps(ns: dict, scales, nan_at=()) -> list[tuple[list, list]]:
    """One step per scale through the snippet's watch `w` (loss = mean((scale * model(x))^2), fresh x each
    step, lr 0 so the model stays put). Returns per step (gradients before the guard, after it)."""
    model, opt, w = ns["model"], ns["opt"], ns["w"]
    for g in opt.param_groups:
        g["lr"] = 0.0
    gen = torch.Generator().manual_seed(1)
    steps = []
    for i, scale in enumerate(scales):
        opt.zero_grad()
        x = torch.randn(16, 4, generator=gen)
        if i in nan_at:
            x[0, 0] = math.nan
        loss = (scale * model(x)).pow(2).mean()
        loss.backward()
        raw = [p.grad.detach().clone() for p in model.parameters()]
        w.step(loss)
        steps.append((raw, [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]))
        opt.step()
    return steps


def _total_rel(grads) -> float:
    """How far the recorded float32 global norm may be from the exact one."""
    return total_norm_rel(norm_rel(max(g.numel() for g in grads)), len(grads))


@check("clip_value")
def _(ns, before):
    (raw, after), = _guarded_steps(ns, [100.0])
    assert max(float(g.abs().max()) for g in raw) > 0.5  # something to clip
    for r, a in zip(raw, after):
        assert torch.equal(a, r.clamp(-0.5, 0.5))  # clamping is exact


@check("clip_norm")
def _(ns, before):
    (raw, after), = _guarded_steps(ns, [100.0])
    raw_norm, rel = _flat_norm(raw), clipped_grad_rel(_total_rel(raw))
    assert raw_norm > 1.0
    assert _flat_norm(after) <= 1.0 * (1 + rel)
    for r, a in zip(raw, after):  # the direction is kept: one factor max_norm / ||g|| for every tensor
        torch.testing.assert_close(a.double(), r.double() / raw_norm, rtol=rel + 1e-6 / raw_norm, atol=0)


@check("clip_norm_per_tensor")
def _(ns, before):
    (raw, after), = _guarded_steps(ns, [100.0])
    clipped = 0
    for r, a in zip(raw, after):
        rel = clipped_grad_rel(norm_rel(r.numel()))
        assert _flat_norm([a]) <= 1.0 * (1 + rel)
        if _flat_norm([r]) < 1.0 * (1 - rel) - 1e-6:
            assert torch.equal(a, r)  # a coefficient of exactly 1
        clipped += _flat_norm([r]) > 1.0
    assert clipped >= 2


@check("auto_clip")
def _(ns, before):
    scales = [1.0, 1.5, 2.0, 4.0, 8.0, 16.0]
    history = []
    for raw, after in _guarded_steps(ns, scales):
        history.append(_flat_norm(raw))
        threshold = float(np.percentile(history, 10))  # AutoClip: the 10th percentile of all norms so far
        rel = compose(_total_rel(raw), clip_coef_rel(_total_rel(raw)), U32, U32) + 1e-6 / history[-1]
        assert _flat_norm(after) == pytest.approx(min(history[-1], threshold), rel=rel)
    assert history[-1] > 2 * threshold  # the last steps were clipped


@check("agc")
def _(ns, before):
    (raw, after), = _guarded_steps(ns, [100.0])
    names = [n for n, _ in ns["model"].named_parameters()]
    triggered = 0
    for name, w, r, a in zip(names, before.params, raw, after):
        if name.startswith("4."):  # the final layer is left alone (the paper's advice)
            assert torch.equal(a, r)
            continue
        rows = (lambda t: t.double().flatten(1).norm(dim=1)) if w.ndim > 1 else (lambda t: t.double().norm()[None])
        bound = 0.01 * rows(w).clamp_min(1e-3)
        rel = compose(norm_rel(w[0].numel()), norm_rel(w[0].numel()), U32, U32, U32)
        assert (rows(a) <= bound * (1 + rel)).all(), name
        keep = rows(r) < bound * (1 - rel)  # units under the bound are not touched
        assert torch.equal(a.flatten(1)[keep] if w.ndim > 1 else a[keep.expand(a.shape)],
                           r.flatten(1)[keep] if w.ndim > 1 else r[keep.expand(r.shape)])
        triggered += int((~keep).sum())
    assert triggered > 0


@check("zclip")
def _(ns, before):
    warmup = _guarded_steps(ns, [1.0] * 25)  # the default warmup: 25 steps, nothing clipped
    for raw, after in warmup:
        assert all(torch.equal(r, a) for r, a in zip(raw, after))
    norms = np.array([_flat_norm(raw) for raw, _ in warmup])
    mean, std = norms.mean(), norms.std()  # population statistics of the warmup norms
    # then the first batch again, its gradient scaled to a z-score of about 8: an outlier, but not so far out
    # that the clipped norm is the mean whatever z_threshold is (the gradient scales as the square of `scale`)
    (raw, after), = _guarded_steps(ns, [math.sqrt((mean + 8 * std) / norms[0])])
    g = _flat_norm(raw)
    z = (g - mean) / (std + 1e-6)
    target = mean + 2.5 ** 2 * std / z  # the paper's adaptive clip of an outlier: mu + z_thr^2 sigma / z
    assert z > 2.5 and g > target
    # the recorded norms are within total_rel; each deviation from the mean within 2 total_rel mean, so sigma
    # within 4 total_rel mean / sigma (+ the float32 mean/variance of 25 values, gamma(26))
    total_rel = _total_rel(raw)
    std_rel = 4 * total_rel * mean / std + gamma(26)
    rel = compose(total_rel, gamma(26), clip_coef_rel(total_rel), U32) + std_rel * (target - mean) / target
    assert _flat_norm(after) == pytest.approx(target, rel=rel)
    assert (_flat_norm(after) - mean) / std <= 2.5  # the clipped norm is no outlier


@check("skip_nonfinite")
def _(ns, before):
    model, opt, w = ns["model"], ns["opt"], ns["w"]
    gen = torch.Generator().manual_seed(1)
    for bad in (False, True):
        opt.zero_grad()
        x = torch.randn(16, 4, generator=gen)
        if bad:
            x[0, 0] = math.nan
        model(x).pow(2).mean().backward()
        weights = [p.detach().clone() for p in model.parameters()]
        w.step(None)
        assert all(p.grad is None for p in model.parameters()) == bad
        opt.step()
        changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), weights)]
        assert (not any(changed)) if bad else all(changed)  # a NaN step writes nothing into the weights


@check("rollback")
def _(ns, before):
    model, opt, rb = ns["model"], ns["opt"], ns["rb"]
    gen = torch.Generator().manual_seed(1)
    for _step in range(12):  # healthy steps: enough history for the spike test (min_history=10)
        opt.zero_grad()
        loss = model(torch.randn(16, 4, generator=gen)).pow(2).mean()
        loss.backward()
        opt.step()
        assert rb.step(loss)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.params))
    assert not rb.step(1000 * float(loss.detach()) + 1000)  # a spike: back to the last snapshot (step 0, every=50)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.params))
    assert rb.skipping()  # the batches after the spike are dropped


# ------------------------------------------------------------------ changes to the training code
@check("lower_learning_rate")
def _(ns, before):
    model, opt = ns["model"], ns["opt"]
    assert opt.param_groups[0]["lr"] == before.lr * 0.1
    opt.zero_grad()
    ns["loss"].backward()
    old = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, q in zip(model.parameters(), old):  # SGD: w -= lr g, with the new lr; two float32 roundings
        step = before.lr * 0.1 * p.grad
        torch.testing.assert_close(q - p.detach(), step, rtol=0, atol=float(2 * U32 * (q.abs() + step.abs()).max()))


@check("sanitize_inputs")
def _(ns, before):
    x, x0 = ns["x"], before.x
    assert torch.isfinite(x).all() and float(x.abs().max()) <= 10
    assert x[0, :4].tolist() == [0.0, 0.0, 0.0, 10.0]  # NaN and +-Inf dropped to 0, the outlier clamped
    ok = torch.isfinite(x0) & (x0.abs() <= 10)
    assert torch.equal(x[ok], x0[ok])


def _penalty_check(ns, before, value: float, grad_of: Callable[[torch.Tensor], torch.Tensor]):
    """The new loss is the old one plus `value` (float32: the penalty's sum, its scaling, the addition), and
    its gradient is the old one plus `grad_of(w)` on every weight matrix (biases are not penalized)."""
    model, new = ns["model"], ns["loss"]
    n = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    new_value = float(new.detach())
    assert abs((new_value - float(before.loss)) - value) <= value * compose(gamma(n), U32, U32) + U32 * abs(new_value)
    grads = torch.autograd.grad(new, list(model.parameters()))
    old = torch.autograd.grad(model(ns["x"]).pow(2).mean(), list(model.parameters()))
    for p, g, g0 in zip(model.parameters(), grads, old):
        extra = grad_of(p.detach()) if p.ndim >= 2 else torch.zeros_like(p)
        torch.testing.assert_close(g - g0, extra, rtol=0, atol=float(4 * U32 * (g0.abs() + extra.abs()).max()))


@check("l1_penalty")
def _(ns, before):
    weights = [p.detach().double() for p in ns["model"].parameters() if p.ndim >= 2]
    _penalty_check(ns, before, 1e-5 * sum(float(w.abs().sum()) for w in weights), lambda w: 1e-5 * w.sign())


@check("l2_penalty")
def _(ns, before):
    weights = [p.detach().double() for p in ns["model"].parameters() if p.ndim >= 2]
    # gradient 1e-4 * w: SGD's weight_decay=1e-4
    _penalty_check(ns, before, 1e-4 / 2 * sum(float(w.square().sum()) for w in weights), lambda w: 1e-4 * w)


@check("fewer_layers")
def _(ns, before):
    assert sum(isinstance(m, nn.Linear) for m in ns["model"].modules()) == ns["depth"] // 2
    assert ns["model"](ns["x"]).shape[0] == ns["x"].shape[0]


@check("smaller_batches")
def _(ns, before):
    batches = [b for (b,) in ns["loader"]]
    assert {len(b) for b in batches} == {ns["batch_size"] // 4}
    rows = sorted(map(tuple, torch.cat(batches).tolist()))
    assert rows == sorted(map(tuple, ns["dataset"].tensors[0].tolist()))  # every example once per epoch


@check("truncated_bptt")
def _(ns, before):
    seq, rnn, out = ns["seq"], ns["rnn"], ns["out"]
    full, _ = rnn(seq, torch.zeros(1, 2, 8))
    torch.testing.assert_close(out, full[:, 35:], rtol=0, atol=1e-6)  # the forward values are unchanged
    out.sum().backward()
    assert torch.count_nonzero(seq.grad[:, :35]) == 0  # no gradient past the cut
    assert torch.count_nonzero(seq.grad[:, 35:]) > 0


# ------------------------------------------------------------------ activation swaps and other surgery
def _swap_check(act: Callable[[torch.Tensor], torch.Tensor], cls: type[nn.Module]):
    def run(ns, before):
        model = ns["model"]
        assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())
        assert sum(type(m) is cls for m in model.modules()) == 2  # one per Sigmoid
        lin = [m for m in before.modules if isinstance(m, nn.Linear)]
        want = lin[2](act(lin[1](act(lin[0](ns["x"])))))  # the same weights, the new activation
        got = model(ns["x"])
        assert got.shape == before.out.shape and torch.equal(got, want)
    return run


check("relu")(_swap_check(F.relu, nn.ReLU))
check("leaky_relu")(_swap_check(lambda t: F.leaky_relu(t, 0.01), nn.LeakyReLU))
check("elu")(_swap_check(F.elu, nn.ELU))


def _norm_check(kind: type[nn.Module], dim: int):
    """After `add_norm`, each norm layer's output (training mode) has mean 0 and variance v / (v + eps) along
    `dim`, v the biased variance of its input, up to the float32 mean/variance of the reduced entries."""
    def run(ns, before):
        model = ns["model"]
        norms = [m for m in model.modules() if isinstance(m, kind)]
        assert len(norms) == sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 2
        seen = []
        def hook(m, i, o):
            seen.append((i[0].detach().double(), o.detach().double()))
        handles = [m.register_forward_hook(hook) for m in norms]
        model.train()
        out = model(ns["x"])
        for h in handles:
            h.remove()
        assert out.shape == before.out.shape
        for inp, o in seen:
            k = inp.shape[dim]
            v = inp.var(dim=dim, unbiased=False)
            scale = float(o.abs().max())
            assert float(o.mean(dim=dim).abs().max()) <= 2 * gamma(k) * scale
            torch.testing.assert_close(o.var(dim=dim, unbiased=False), v / (v + 1e-5), rtol=4 * gamma(k), atol=0)
    return run


check("batch_norm")(_norm_check(nn.BatchNorm1d, 0))
check("layer_norm")(_norm_check(nn.LayerNorm, 1))


@check("add_residual")
def _(ns, before):
    model = ns["model"]
    blocks = [m for m in model.modules() if isinstance(m, Residual)]
    assert len(blocks) == 1 and isinstance(blocks[0].branch[1], nn.Linear)  # [Sigmoid, Linear(8, 8)]
    lin = [m for m in before.modules if isinstance(m, nn.Linear)]
    want = lin[2](torch.sigmoid(lin[0](ns["x"])))  # the block starts as the identity
    assert torch.equal(model(ns["x"]), want)
    z = torch.randn(5, 8)
    assert torch.equal(blocks[0](z), z)


def _rnn_swap_check(cls: type[nn.Module]):
    def run(ns, before):
        model = ns["model"]
        assert not any(type(m) is nn.RNN for m in model.modules())
        new = [m for m in model.modules() if isinstance(m, cls)]
        assert len(new) == 1 and (new[0].input_size, new[0].hidden_size, new[0].batch_first) == (3, 8, True)
        assert model(ns["x"]).shape == before.out.shape  # the old forward() still works
    return run


check("rnn_to_lstm")(_rnn_swap_check(nn.LSTM))
check("rnn_to_gru")(_rnn_swap_check(nn.GRU))


@check("layerwise_pretrain")
def _(ns, before):
    model = ns["model"]
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    params = list(model.parameters())
    assert torch.equal(params[-2], before.params[-2]) and torch.equal(params[-1], before.params[-1])  # output layer
    assert all(not torch.equal(p, q) for p, q in zip(params[:-2], before.params[:-2]))  # every hidden layer
    # the first layer is now a tied-weight autoencoder of the (standardized) input: with its transpose as the
    # decoder it reconstructs x far better than the random layer it started as. The layer takes raw inputs
    # (the standardization is folded into it), so unfold it with the data's own mean and std.
    x = ns["x_train"]
    mean, std = x.mean(0), x.std(0)
    xs = (x - mean) / std

    def recon_error(w_raw: torch.Tensor, b_raw: torch.Tensor, folded: bool) -> float:
        w, b = (w_raw * std, b_raw + w_raw @ mean) if folded else (w_raw, b_raw)
        r = torch.sigmoid(xs @ w.T + b) @ w
        return float((r - (r - xs).mean(0) - xs).pow(2).mean())  # with the best decoder bias
    trained = recon_error(lin[0].weight.detach(), lin[0].bias.detach(), True)
    assert trained < 0.5 * recon_error(before.params[0], before.params[1], False), trained


# ------------------------------------------------------------------ init schemes
def _sd_tol(w: torch.Tensor) -> float:
    """4 standard errors of a sample std (relative SE ~ 1/sqrt(2n)): a statistical margin (two-sided 6e-5)."""
    return 4 / math.sqrt(2 * w.numel())


def _init_check(std_of: Callable[[nn.Linear, float], float], gain: float):
    """Each layer's weight std is `std_of(layer, gain)`, gain that of the activation after it (1 for the output
    layer), its mean 0 (4 standard errors), its bias zero."""
    def run(ns, before):
        lin = [m for m in ns["model"].modules() if isinstance(m, nn.Linear)]
        for i, layer in enumerate(lin):
            w = layer.weight.detach()
            want = std_of(layer, gain if i + 1 < len(lin) else 1.0)
            assert float(w.std()) == pytest.approx(want, rel=_sd_tol(w))
            assert abs(float(w.mean())) <= 4 * want / math.sqrt(w.numel())
            assert torch.count_nonzero(layer.bias) == 0
    return run


check("he_init")(_init_check(lambda m, g: g / math.sqrt(m.in_features), math.sqrt(2)))  # ReLU's gain
check("xavier_init")(_init_check(lambda m, g: g * math.sqrt(2 / (m.in_features + m.out_features)), 5 / 3))  # tanh


@check("orthogonal_init")
def _(ns, before):
    rnn, head = ns["model"].rnn, ns["model"].head
    w = rnn.weight_hh_l0.detach()  # one gate: one orthogonal block, so repeated products keep norms
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=orthogonality_bound(8, 8), rtol=0)
    h = head.weight.detach()  # 1 x 8, gain 1 (no activation after it): a unit row
    torch.testing.assert_close(h @ h.T, torch.eye(1), atol=orthogonality_bound(8, 1), rtol=0)
    assert torch.count_nonzero(rnn.bias_hh_l0) == 0 and torch.count_nonzero(head.bias) == 0


@check("lsuv_init")
def _(ns, before):
    model = ns["model"]
    seen = []
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(float(o.detach().double().var()))) for m in lin]
    model(ns["x_batch"])
    for h in handles:
        h.remove()
    assert all(abs(v - 1.0) <= 0.1 for v in seen), seen  # unit output variance, to lsuv_'s tol


@check("zero_residual_init")
def _(ns, before):
    blocks = [m for m in ns["model"].modules() if isinstance(m, Residual)]
    assert blocks
    z = torch.randn(5, 8)
    for b in blocks:
        assert torch.equal(b(z), z)  # every block is the identity again
    assert not torch.equal(ns["model"](ns["x"]), before.out)


@check("lr_warmup")
def _(ns, before):
    opt, scheduler = ns["opt"], ns["scheduler"]
    for k in range(120):  # the analytic linear warmup: lr_k = lr * min(1, (k + 1) / 100)
        assert math.isclose(opt.param_groups[0]["lr"], before.lr * min(1.0, (k + 1) / 100), rel_tol=1e-12)
        opt.step()
        scheduler.step()


@check("gpt2_init")
def _(ns, before):
    # N(0, 0.02) everywhere, N(0, 0.02 / sqrt(4)) for the 4 residual projections (2 x out_proj, 2 x linear2);
    # a sample std of n normal draws is off by a relative ~1/sqrt(2n): 6 of those is a margin no seed misses.
    for layer in ns["model"].layers:
        for name, w, std in (("in_proj", layer.self_attn.in_proj_weight, 0.02), ("linear1", layer.linear1.weight, 0.02),
                             ("out_proj", layer.self_attn.out_proj.weight, 0.01), ("linear2", layer.linear2.weight, 0.01)):
            got = float(w.detach().double().std())
            assert abs(got / std - 1) < 6 / math.sqrt(2 * w.numel()), (name, got, std)
        assert float(layer.linear1.bias.abs().max()) == 0.0 and float(layer.self_attn.in_proj_bias.abs().max()) == 0.0
        assert float((layer.norm1.weight - 1).abs().max()) == 0.0


@check("pass_scaler")
def _(ns, before):
    w, scaler = ns["w"], ns["scaler"]
    assert isinstance(scaler, torch.amp.GradScaler) and isinstance(w, gd.Watch) and w.recording
    # the watch holds the scaler it was given (None only where that scaler is disabled, as on a CPU-only box)
    assert w.scaler is (scaler if scaler.is_enabled() else None)


@check("pre_layer_norm")
def _(ns, before):
    model = ns["model"]
    assert all(layer.norm_first for layer in model.layers) and isinstance(model.norm, nn.LayerNorm)
    # The oracle: PyTorch's own pre-LN stack (norm_first=True from construction, a final LayerNorm) with the
    # same weights gives the same output.
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 1, 8, dropout=0.0, norm_first=True), 2,
                                norm=nn.LayerNorm(4), enable_nested_tensor=False)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ns["x"]), ref(ns["x"]), rtol=0, atol=0)
    assert not torch.allclose(model(ns["x"]), before.out)


@check("qk_norm")
def _(ns, before):
    # The snippet's QKNorm against the float64 LayerNorm formula, and the bound it gives: with unit gains each
    # head's q and k have norm sqrt(d), so |q.k|/sqrt(d) <= sqrt(d) however large q and k were.
    d = 8
    qk = ns["QKNorm"](d)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, d, generator=g) * 300, torch.randn(2, 3, 5, d, generator=g) * 300
    qn, kn = (t.detach() for t in qk(q, k))
    for x, y in ((q, qn), (k, kn)):
        x64 = x.double()
        want = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
        assert float((y.double() - want).abs().max()) <= 1e-5  # float32 normalization of O(1) values: ~d u
    logits = (qn.double() @ kn.double().transpose(-1, -2)).abs() / math.sqrt(d)
    assert float(logits.max()) <= math.sqrt(d) * (1 + 1e-5)
    assert float((q.double() @ k.double().transpose(-1, -2)).abs().max()) / math.sqrt(d) > 1e4  # it was large


@check("z_loss")
def _(ns, before):
    # loss + coef * mean(logsumexp(logits)^2), against the float64 formula on the model's own output
    a = before.out.double().numpy()
    m = a.max(axis=-1, keepdims=True)
    logz = (m + np.log(np.exp(a - m).sum(axis=-1, keepdims=True)))[..., 0]
    want = float(before.loss) + 1e-4 * float(np.mean(logz ** 2))
    assert abs(float(ns["loss"].detach()) - want) <= 1e-6 * abs(want) + 1e-9  # float32 sums of O(1) values
    assert ns["loss"].requires_grad


# ------------------------------------------------------------------ ids, former ids, JSON
def test_catalogue_ids_match_treat():
    assert set(CATALOGUE) == set(gd.treat.REMEDIES) and CATALOGUE is gd.treat.CATALOGUE


def test_json_lists_the_former_ids_of_renamed_remedies():
    f = Finding("exploding_gradient", "critical", 0, 3, ("0.weight",), {}, "recurrence", "m",
                remedies=(remedy("clip_by_norm"), remedy("zclip"), remedy("lstm")))
    assert [r.id for r in f.remedies] == ["clip_norm", "zclip", "rnn_to_lstm"]
    got = findings_document([f])["findings"][0]["remedies"]
    assert got[0] == {**Remedy("clip_norm", CATALOGUE["clip_norm"].why, CATALOGUE["clip_norm"].snippet).to_dict(),
                      "aliases": ["clip_by_norm"]}
    assert "aliases" not in got[1] and got[2]["aliases"] == ["lstm"]
    # a consumer matching the old id keeps finding it
    assert any(r["id"] == "clip_by_norm" or "clip_by_norm" in r.get("aliases", ()) for r in got)
