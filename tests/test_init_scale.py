"""Initialization scale in transformers: a nanoGPT-style GPT initialised N(0, 1) (about 50x GPT-2's 0.02)
is flagged by `gd.check` and by diagnose (a finding naming initialization); the default 0.02 GPT is
healthy, over 3 seeds.

The GPT: token + position embeddings, the pre-LN blocks of tests/_diag_runs.py (causal self-attention and
a GELU MLP), an untied `lm_head`, every Linear and Embedding weight N(0, std) and the biases zero. Oracles:
the weights' std * sqrt(fan_in) and ln(vocab), computed here in float64 from the model itself, and the
loss of the first batch as the loop saw it.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from _diag_runs import _GPTBlock
from torch import nn
from torch.nn import functional as F

import graddoctor as gd
from graddoctor.diagnosis import DiagnoseConfig

V, T, E = 64, 16, 32


class GPT(nn.Module):
    def __init__(self, std=0.02, H=2, L=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, E), nn.Embedding(T, E)
        self.h = nn.ModuleList(_GPTBlock(E, H, qk_norm=False) for _ in range(L))
        self.ln_f, self.lm_head = nn.LayerNorm(E), nn.Linear(E, V, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        return self.lm_head(self.ln_f(x))


def _lm_loss(out, targets):
    return F.cross_entropy(out.reshape(-1, V), targets.reshape(-1))


def _gains(model):
    """std * sqrt(fan_in) of every Linear weight, in float64 (the oracle for the weight scale)."""
    return [float(m.weight.detach().double().std() * math.sqrt(m.weight.shape[1]))
            for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_check_flags_an_n01_gpt_and_calls_the_default_one_healthy(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, V, (8, T), generator=g), torch.randint(0, V, (8, T), generator=g)
    torch.manual_seed(seed)
    good, bad = GPT(std=0.02), GPT(std=1.0)
    th = gd.CheckThresholds()
    gains = sorted(_gains(bad))
    with torch.no_grad():
        loss_bad, loss_good = float(_lm_loss(bad(x), y)), float(_lm_loss(good(x), y))
    assert gains[len(gains) // 2] > th.weight_gain_high or loss_bad > th.loss_over_uniform_high * math.log(V), \
        "premise: the N(0, 1) GPT is far off scale"
    report = gd.check(bad, x, y, loss_fn=_lm_loss)
    assert report.verdict in ("exploding", "poor_initialization"), gd.format_check(report)
    assert report.loss_over_uniform == pytest.approx(loss_bad / math.log(V), rel=1e-5)
    ok = gd.check(good, x, y, loss_fn=_lm_loss)
    assert ok.verdict == "healthy", gd.format_check(ok)
    assert ok.loss_over_uniform == pytest.approx(loss_good / math.log(V), rel=1e-5)


def _record(run_dir, std, seed, steps=6):
    torch.manual_seed(seed)
    model = GPT(std=std)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, opt, run_dir, flush_every=steps) as w:
            for _ in range(steps):
                x, y = torch.randint(0, V, (8, T), generator=g), torch.randint(0, V, (8, T), generator=g)
                loss = _lm_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                w.step(loss)
                opt.step()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagnose_names_initialization_for_a_recorded_n01_gpt(tmp_path, seed):
    _record(tmp_path / "bad", 1.0, seed)
    findings = gd.diagnose(tmp_path / "bad")
    init = [f for f in findings if f.cause == "initialization"]
    assert init and init[0].code == "poor_initialization", [(f.code, f.cause, f.message) for f in findings]
    ev = init[0].evidence
    torch.manual_seed(seed)
    gains = sorted(_gains(GPT(std=1.0)))  # the same init, rebuilt: the oracle for the recorded scale
    # the recorded median gain (weight norms in float32, rounded to 3 digits in the evidence) against float64
    assert ev["median_weight_gain"] == pytest.approx(gains[len(gains) // 2], rel=5e-3)
    assert ev["uniform_loss_ln_vocab"] == pytest.approx(math.log(V), rel=5e-3)
    _record(tmp_path / "good", 0.02, seed)
    assert not any(f.code == "poor_initialization" or f.cause == "initialization"
                   for f in gd.diagnose(tmp_path / "good"))


def test_an_embedding_scaled_x100_is_named(tmp_path):
    """PyTorch's nn.Embedding default is N(0, 1); x100 swamps everything after it."""
    torch.manual_seed(0)
    model = GPT(std=0.02)
    with torch.no_grad():
        model.wte.weight.normal_(0.0, 100.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    x, y = torch.randint(0, V, (8, T)), torch.randint(0, V, (8, T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, opt, tmp_path / "big", flush_every=3) as w:
            for _ in range(3):
                loss = _lm_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                w.step(loss)
                opt.step()
    f = [f for f in gd.diagnose(tmp_path / "big") if f.code == "poor_initialization"]
    assert f and "wte.weight" in f[0].layers and f[0].cause == "initialization"
    assert f[0].evidence["embedding_rms"]["wte.weight"] > DiagnoseConfig().init_embed_rms_high
