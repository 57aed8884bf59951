"""Residual structure read off the first training forward (graddoctor.core._structure), recorded by watch,
loaded into RunData, and used by the causes. The oracle is each model's own definition: which forward adds
its input back is written in the model classes below (and in PyTorch's TransformerEncoderLayer)."""
from __future__ import annotations

import numpy as np
import torch
from _diag_synth import make_data
from torch import nn
from torch.nn import functional as F

import graddoctor as gd
from graddoctor.core._structure import StructureProbe
from graddoctor.diagnosis import DiagnoseConfig, RunData, diagnose_data


class Block(nn.Module):  # nanoGPT's pre-LN block: x + attn(ln(x)), x + mlp(ln(x))
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=16, d=16, n=3):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.h:
            x = b(x)
        return self.head(x)


class BasicBlock(nn.Module):  # ResNet: relu(bn(conv(x)) + x)
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn1(self.conv1(x)) + x)


def _facts(model, x):
    probe = StructureProbe(model)
    with torch.no_grad():
        model(x)  # an eval pass builds no graph: the probe waits for a training forward
    assert not probe.done
    model(x)
    assert probe.done and not probe._handles  # one-shot: the hooks are gone
    return probe.facts()


def test_gpt_blocks_are_residual_and_pre_ln():
    f = _facts(GPT(), torch.randint(0, 16, (2, 5)))
    assert f["residual"] == ["h.0", "h.1", "h.2"] and f["post_norm"] == [] and f["norm_first"] == {}


def test_transformer_encoder_layers_post_and_pre_ln():
    for norm_first in (False, True):
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                                               norm_first=norm_first), 3, enable_nested_tensor=False)
        f = _facts(enc, torch.randn(2, 5, 16))  # the first layer's input needs no grad: found by its class
        layers = ["layers.0", "layers.1", "layers.2"]
        assert f["residual"] == layers  # innermost only: the encoder (a stack of them) is not listed
        assert f["post_norm"] == ([] if norm_first else layers)
        assert f["norm_first"] == dict.fromkeys(layers, norm_first)


def test_resnet_block_residual_and_plain_nets_are_not():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BasicBlock(4), BasicBlock(4))
    assert _facts(cnn, torch.randn(2, 3, 6, 6))["residual"] == ["1", "2"]
    mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2))
    f = _facts(mlp, torch.randn(4, 8))
    assert f["residual"] == [] and "2" in f["same_shape"] and "3" not in f["same_shape"]


def test_watch_records_the_structure_and_the_warmup(tmp_path):
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = gd.treat.lr_warmup(opt, 10)
    w = gd.watch(model, opt, tmp_path / "run")
    for _ in range(3):
        x = torch.randint(0, 16, (2, 5))
        loss = F.cross_entropy(model(x).reshape(-1, 16), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
        sched.step()
    w.close()
    with gd.open_run(tmp_path / "run") as run:
        assert [e["step"] for e in run.events("structure")] == [0]
        d = RunData.from_run(run)
    assert d.residual == frozenset({"h.0", "h.1", "h.2"}) and d.post_norm == frozenset()
    assert d.structure["lr"] == [1e-3 / 10] and d.lr_warmup is True


def test_old_stores_are_unknown_not_plain():
    d = make_data()
    assert d.structure is None and d.residual is None and not d.has_residual and d.lr_warmup is None


# ------------------------------------------------------------------ causes
CFG = DiagnoseConfig()


def _vanishing(structure):
    T, P = 200, 12  # input side 10^-4 of the output side, healthy init: a depth profile
    g = np.tile(np.logspace(-6, -2, P).astype(np.float32) * 4, (T, 1))
    d = make_data(T=T, P=P, grad_norm=g)
    d.structure = structure
    return {f.code: f for f in diagnose_data(d, CFG)}["vanishing_gradient"]


def test_residual_nets_are_not_called_a_chain():
    plain = _vanishing(None)
    assert plain.cause == "depth"
    pre = _vanishing({"residual": ["l1"], "post_norm": [], "norm_first": {}, "lr": [1e-3], "initial_lr": [None]})
    assert pre.cause != "depth" and "chain" not in pre.evidence["reasoning"]
    post = _vanishing({"residual": ["l1"], "post_norm": ["l1"], "norm_first": {"l1": False}, "lr": [1e-3],
                       "initial_lr": [None]})
    assert post.cause == "architecture" and "Xiong" in post.evidence["reasoning"]
    assert [r.id for r in post.remedies[:2]] == ["lr_warmup", "pre_layer_norm"]


def test_early_explosion_on_a_residual_net_is_the_learning_rate():
    T, P = 120, 12
    g = np.tile(np.full(P, 0.04, np.float32), (T, 1))
    g[5:] *= np.logspace(0, 4, T - 5, dtype=np.float32)[:, None]  # rising 4 orders from step 5
    for structure, cause in ((None, None), ({"residual": ["l1"], "post_norm": []}, "learning_rate")):
        d = make_data(T=T, P=P, grad_norm=g, loss=np.linspace(2, 3, T))
        d.structure = structure
        f = {f.code: f for f in diagnose_data(d, CFG)}["exploding_gradient"]
        assert "without skips" not in f.evidence["reasoning"] or structure is None
        if cause:
            assert f.cause == cause


def test_a_nan_out_of_a_calm_run_is_no_explosion():
    T, P = 200, 12
    for last in (T, 125):  # the run ends non-finite / recovers
        d = make_data(T=T, P=P, loss=np.linspace(2, 1, T))
        bad = slice(120, last)
        d.loss[bad] = np.nan
        d.grad_norm[bad] = np.nan
        d.global_norm[bad] = np.nan
        d.grad_nonfinite[bad] = 5
        found = {f.code: f for f in diagnose_data(d, CFG)}
        assert "exploding_gradient" not in found and found["nonfinite_gradient"].first_step == 120
        assert "rose" not in found["nonfinite_gradient"].evidence["reasoning"]
