"""Transformer stability signals: attention logits and log Z recorded on sampled steps, the rules
attention_logit_growth and output_logit_divergence, the update spike named before a loss spike, z_loss.

Oracles: q and k captured by the test's own hooks (or projected by hand from in_proj_weight) and the
logits computed in float64; torch.logsumexp in float64; a float64 formula for z_loss. Tolerances are
worst-case float32 rounding bounds (tests/_numerics.py).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _diag_runs import _GPT as GPT  # the nanoGPT-style GPT of the labelled runs
from _diag_synth import make_data
from _numerics import U32, dot_bound, gamma
from torch import nn

import graddoctor as gd
from graddoctor._errors import ConfigError
from graddoctor.diagnosis import RunData
from graddoctor.diagnosis._config import DiagnoseConfig
from graddoctor.diagnosis._diagnose import diagnose_data


def _train_gpt(run_dir, lr: float, qk_norm: bool, seed: int, steps: int = 30, every: int = 5):
    """A copy-the-previous-token task on random tokens; returns the model."""
    torch.manual_seed(seed)
    model = GPT(qk_norm=qk_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    w = gd.watch(model, opt, run_dir=run_dir, activation_every=every, live_diagnosis=False)
    for _ in range(steps):
        x = torch.randint(0, 32, (8, 16), generator=g)
        loss = F.cross_entropy(model(x).flatten(0, 1), torch.roll(x, 1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
    w.close()
    return model


# ------------------------------------------------------------------ oracles
def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """[B, T, E] -> [B, h, T, E / h]."""
    B, T, E = t.shape
    return t.reshape(B, T, h, E // h).transpose(1, 2)


def _max_logit_and_bound(q: torch.Tensor, k: torch.Tensor, h: int, dq=None, dk=None) -> tuple[float, float]:
    """(max |q.k|/sqrt(d) in float64 from float32 q, k, and a bound on float32's error in computing it).

    dq, dk: bounds on the error already in q and k (the recorded run computes its own projection).
    """
    qh, kh = _heads(q.double(), h), _heads(k.double(), h)
    d = qh.shape[-1]
    s = 1.0 / math.sqrt(d)
    exact = (qh @ kh.transpose(-1, -2)).abs() * s
    err = dot_bound(qh, kh.transpose(-1, -2))  # the logits' matmul in float32
    if dq is not None:
        dqh, dkh = _heads(dq, h), _heads(dk, h)
        err = err + dqh @ kh.abs().transpose(-1, -2) + qh.abs() @ dkh.transpose(-1, -2) + dqh @ dkh.transpose(-1, -2)
    # x s and max: one rounding of the product; the max of perturbed values moves by at most the largest error
    bound = float((err * s).max()) + 2 * U32 * float(exact.max())
    return float(exact.max()), bound


def _recorded(run_dir):
    with gd.open_run(run_dir) as r:
        return RunData.from_run(r)


# ------------------------------------------------------------------ recorded values against oracles
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_max_logit_equals_float64_oracle(tmp_path, batch_first):
    torch.manual_seed(0)
    E, H = 16, 4
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    seen: dict[int, torch.Tensor] = {}
    for i, lay in enumerate(model.layers):  # the test's own capture: self_attn's query input
        lay.self_attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gd.watch(model, opt, run_dir=tmp_path / "run", activation_every=1, live_diagnosis=False)
    x = torch.randn((3, 7, E) if batch_first else (7, 3, E))
    model(x).square().mean().backward()
    w.step()
    w.close()
    d = _recorded(tmp_path / "run")
    assert d.attn_modules == ["layers.0.self_attn", "layers.1.self_attn"] and d.attn.shape == (1, 2, 3)
    for i, lay in enumerate(model.layers):
        a = lay.self_attn
        inp = seen[i].double() if batch_first else seen[i].double().transpose(0, 1)
        W, b = a.in_proj_weight.detach().double(), a.in_proj_bias.detach().double()
        q, k = inp @ W[:E].T + b[:E], inp @ W[E:2 * E].T + b[E:2 * E]
        # the projection's own float32 error in the recorded run (E products and the bias: E + 1 roundings)
        dq = gamma(E + 1) * (inp.abs() @ W[:E].abs().T + b[:E].abs())
        dk = gamma(E + 1) * (inp.abs() @ W[E:2 * E].abs().T + b[E:2 * E].abs())
        want, bound = _max_logit_and_bound(q, k, H, dq, dk)
        assert abs(float(d.attn[0, i, 0]) - want) <= bound, (i, float(d.attn[0, i, 0]), want, bound)
        qn = _heads(q, H).norm(dim=-1).max().item()
        assert abs(float(d.attn[0, i, 1]) - qn) <= 1e-5 * qn  # norms: float32 rounding, far below 1e-5 here


@pytest.mark.slow  # imports transformers
def test_gpt2_logits_and_log_z_equal_float64_oracles(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    model.train()
    qkv: dict[int, torch.Tensor] = {}
    logits: list[torch.Tensor] = []
    for i, block in enumerate(model.transformer.h):
        block.attn.c_attn.register_forward_hook(lambda m, a, out, i=i: qkv.__setitem__(i, out.detach().clone()))
    model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out.detach().clone()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    w = gd.watch(model, opt, run_dir=tmp_path / "run", activation_every=2, live_diagnosis=False)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # steps 0 and 2 are sampled
        qkv.clear()
        logits.clear()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
    w.close()
    d = _recorded(tmp_path / "run")
    assert d.attn_modules == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert d.attn_steps.tolist() == [0, 2] and d.logz_steps.tolist() == [0, 2]
    for i in range(2):  # the last step's captures belong to sample step 2
        q, k, _ = qkv[i].split(32, dim=-1)
        want, bound = _max_logit_and_bound(q, k, 2)
        assert abs(float(d.attn[1, i, 0]) - want) <= bound
    z = torch.logsumexp(logits[0].double(), dim=-1)  # the oracle: float64 logsumexp of the captured logits
    V, n = logits[0].shape[-1], z.numel()
    # float32 logsumexp: max + log(sum exp(x - max)): V exps of <= 1 ulp, a V-term sum, a log and an add
    per = gamma(V + 4) + 3 * U32 * float(z.abs().max())
    assert abs(float(d.logz[1, 0]) - float(z.mean())) <= per + gamma(n) * float(z.abs().mean())
    assert abs(float(d.logz[1, 1]) - float(z.max())) <= per


def test_hooks_exist_only_on_sampled_steps(tmp_path):
    torch.manual_seed(0)
    model = GPT(n_layer=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gd.watch(model, opt, run_dir=tmp_path / "run", activation_every=3, live_diagnosis=False)
    installed = []
    x = torch.randint(0, 32, (2, 16))
    for _ in range(7):
        installed.append(w._signals.installed)
        model(x).square().mean().backward()
        w.step()
        opt.step()
        opt.zero_grad()
    w.close()
    assert installed == [s % 3 == 0 for s in range(7)]
    assert _recorded(tmp_path / "run").attn_steps.tolist() == [0, 3, 6]


def test_a_store_without_the_signals_reads_empty(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with gd.watch(model, run_dir=tmp_path / "run", live_diagnosis=False) as w:
        model(torch.randn(5, 4)).sum().backward()
        w.step()
    d = _recorded(tmp_path / "run")
    assert d.attn.shape == (0, 0, 3) and d.logz.shape == (0, 2) and d.attn_modules == []
    with gd.open_run(tmp_path / "run") as r:
        assert "attn_fields" in r.meta and r.meta["attn_fields"] == []


# ------------------------------------------------------------------ attention logit growth, trained
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_high_lr_grows_attention_logits_and_qk_norm_stops_it(tmp_path, seed):
    # lr 0.1 (AdamW): without QK-norm the max logit reaches 230-590 in 30 steps on seeds 0-2; with it, at most
    # 15 (its LayerNorm gains grow too, but sqrt(d) g_q g_k stays far below 50); at lr 3e-3 it stays below 3.
    _train_gpt(tmp_path / "high", lr=0.1, qk_norm=False, seed=seed)
    found = {f.code: f for f in gd.diagnose(tmp_path / "high")}
    f = found["attention_logit_growth"]
    assert f.evidence["max_logit"] >= 50 and f.evidence["growth"] >= 10
    assert f.remedies[0].id == "qk_norm" and "lower_learning_rate" in [r.id for r in f.remedies]
    _train_gpt(tmp_path / "qk", lr=0.1, qk_norm=True, seed=seed)
    d = _recorded(tmp_path / "qk")
    assert d.attn_modules == ["h.0.attn", "h.1.attn"] and np.isfinite(d.attn[:, :, 0]).all()
    assert "attention_logit_growth" not in {f.code for f in gd.diagnose(tmp_path / "qk")}
    _train_gpt(tmp_path / "normal", lr=3e-3, qk_norm=False, seed=seed)
    assert "attention_logit_growth" not in {f.code for f in gd.diagnose(tmp_path / "normal")}


# ------------------------------------------------------------------ rules on hand-built histories
def test_output_logit_divergence_rule_and_its_remedy():
    d = make_data(T=100)
    d.logz_steps = np.arange(0, 100, 10)
    mean = np.linspace(3.5, -70.0, 10)
    d.logz = np.stack([mean, mean + 2.0], axis=1).astype(np.float32)
    d.modules = dict(d.modules, wte="Embedding")
    f = {f.code: f for f in diagnose_data(d, DiagnoseConfig())}["output_logit_divergence"]
    first = int(d.logz_steps[np.argmax(np.abs(mean) >= 50)])
    assert f.first_step == first and f.evidence["worst_logz_mean"] == pytest.approx(-70.0, rel=1e-6)
    assert f.remedies[0].id == "z_loss"
    d.logz = np.stack([np.full(10, -60.0), np.full(10, -58.0)], axis=1).astype(np.float32)  # started there
    assert "output_logit_divergence" not in {f.code for f in diagnose_data(d, DiagnoseConfig())}


def test_attention_rule_needs_growth_and_level():
    d = make_data(T=100)
    d.attn_steps, d.attn_modules = np.arange(0, 100, 10), ["h.0.attn"]
    grow = np.geomspace(0.5, 400.0, 10)
    d.attn = np.stack([grow, grow, grow], axis=1)[:, None, :].astype(np.float32)
    assert "attention_logit_growth" in {f.code for f in diagnose_data(d, DiagnoseConfig())}
    d.attn = np.full((10, 1, 3), 60.0, np.float32)  # high from the start: no growth
    assert "attention_logit_growth" not in {f.code for f in diagnose_data(d, DiagnoseConfig())}
    with pytest.raises(ConfigError, match="attn_logit_growth"):
        DiagnoseConfig(attn_logit_growth=1.0).validate()


# ------------------------------------------------------------------ an update spike before a loss spike
@pytest.mark.slow
def test_loss_spike_names_the_layer_whose_update_spiked_before_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    w = gd.watch(model, opt, run_dir=tmp_path / "run", sample_every=2, live_diagnosis=False)
    for s in range(80):
        for g in opt.param_groups:
            g["lr"] = 0.5 if s == 60 else 1e-3  # one step at 500x the lr: sample step 60
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
    w.close()
    spike = {f.code: f for f in gd.diagnose(tmp_path / "run")}["loss_spike"]
    assert spike.first_step == 61
    ev = spike.evidence["preceded_by_update_spike"]
    assert ev["steps"] == [60] and ev["factor"] >= 5
    assert ev["layer"] in {"0.weight", "2.weight", "4.weight"}


# ------------------------------------------------------------------ z_loss
def test_z_loss_equals_the_float64_formula():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 4 + 2).requires_grad_(True)
    got = gd.treat.z_loss(logits, coef=1e-4)
    a = logits.detach().double().numpy()
    m = a.max(axis=-1, keepdims=True)
    logz = (m + np.log(np.exp(a - m).sum(axis=-1, keepdims=True)))[..., 0]
    want = 1e-4 * float(np.mean(logz ** 2))
    # per position: logsumexp error <= gamma(V + 4) + 3u|z| (as above); squared doubles it relative to z
    per = gamma(11 + 4) + 3 * U32 * float(np.abs(logz).max())
    bound = 1e-4 * (2 * float(np.abs(logz).max()) * per + per ** 2) + gamma(15 + 3) * abs(want)
    assert abs(float(got.detach()) - want) <= bound
    got.backward()  # the gradient: 2 coef z softmax / n, against the float64 formula
    p = np.exp(a - logz[..., None])
    grad = 2e-4 * logz[..., None] * p / logz.size
    assert np.allclose(logits.grad.double().numpy(), grad, rtol=1e-4, atol=1e-12)
    with pytest.raises(ConfigError, match="coef=-1"):
        gd.treat.z_loss(logits, coef=-1)


def test_qk_norm_applies_to_attention_models_only():
    from graddoctor.treat._applicable import ModelFacts, attention
    assert attention(ModelFacts(modules={"h.0.attn": "CausalSelfAttention", "h.0.attn.c_attn": "Linear"}))
    assert attention(ModelFacts(modules={"l.self_attn": "MultiheadAttention"}))
    assert attention(ModelFacts(modules={"a": "X", "a.q_proj": "Linear", "a.k_proj": "Linear"}))
    assert not attention(ModelFacts(modules={"0": "Linear", "1": "ReLU"}))


def test_no_warning_from_the_signals_on_a_plain_model(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        with gd.watch(model, run_dir=tmp_path / "r", activation_every=1, live_diagnosis=False) as w:
            model(torch.randn(2, 4)).sum().backward()
            w.step()
