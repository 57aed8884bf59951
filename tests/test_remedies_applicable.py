"""Only remedies that apply: for each model, every first remedy diagnose can rank (any code, any cause) applies
through its catalogue function to a fresh copy of that model without raising; lr_warmup against the
analytic linear warmup. The facts come from a real watched run of each model (its store)."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from test_structure import GPT
from torch import nn
from torch.nn import functional as F

import graddoctor as gd
from graddoctor._errors import ConfigError
from graddoctor.diagnosis import CAUSES, CODES, Finding, RunData
from graddoctor.diagnosis._remedies import _RANKING, model_facts, rank_remedies
from graddoctor.treat import CATALOGUE


class LSTMLM(nn.Module):
    def __init__(self, vocab=16, d=16):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(vocab, d), nn.LSTM(d, d, batch_first=True), nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.rnn(self.emb(idx))[0])


class EncoderLM(nn.Module):
    def __init__(self, norm_first, vocab=16, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True,
                                                                    norm_first=norm_first), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.enc(self.emb(idx)))


def _tokens():
    return torch.randint(0, 16, (4, 6))


MODELS = {  # name -> (fresh model, a batch, the loss)
    "gpt": (GPT, _tokens, lambda out, x: F.cross_entropy(out.reshape(-1, 16), x.reshape(-1))),
    "encoder_post_ln": (lambda: EncoderLM(False), _tokens, lambda out, x: F.cross_entropy(out.reshape(-1, 16), x.reshape(-1))),
    "encoder_pre_ln": (lambda: EncoderLM(True), _tokens, lambda out, x: F.cross_entropy(out.reshape(-1, 16), x.reshape(-1))),
    "lstm_lm": (LSTMLM, _tokens, lambda out, x: F.cross_entropy(out.reshape(-1, 16), x.reshape(-1))),
    "deep_mlp": (lambda: nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(8, 8), nn.Sigmoid())], nn.Linear(8, 1)),
                 lambda: torch.randn(8, 8), lambda out, x: out.pow(2).mean()),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4 * 6 * 6, 2)),
            lambda: torch.randn(4, 3, 6, 6), lambda out, x: out.pow(2).mean()),
}


def _train(make, batch, loss_fn, run_dir, steps=2):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    w = gd.watch(model, opt, run_dir)
    for _ in range(steps):
        x = batch()
        loss = loss_fn(model(x), x)
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
    w.close()
    with gd.open_run(run_dir) as run:
        return RunData.from_run(run)


def _apply(remedy_id, make, batch, loss_fn):
    """Apply a cure to a fresh model through its catalogue function, then train one step on the result."""
    cure = CATALOGUE[remedy_id]
    torch.manual_seed(1)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if cure.apply is None:
        return  # a change to the user's own code: the snippet is the remedy
    given = {"model": model, "optimizer": opt, "x": batch(), "data": batch(), "warmup_steps": 10,
             "steps_per_layer": 2, "every": 5}
    args = {}
    for name, p in inspect.signature(cure.apply).parameters.items():
        if name in given:
            args[name] = given[name]
        elif p.default is inspect.Parameter.empty:
            args[name] = 1.0  # a threshold or a strength
    out = cure.apply(**args)
    if isinstance(out, tuple) and isinstance(out[0], nn.Module):  # surgery returns the (rebuilt) model
        model = out[0]
    x = batch()
    loss_fn(model(x), x).backward()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_every_first_remedy_applies_to_the_model(name, tmp_path):
    make, batch, loss_fn = MODELS[name]
    d = _train(make, batch, loss_fn, tmp_path / "run")
    facts = model_facts(d)
    firsts = set()
    for code in CODES:
        for cause in CAUSES:
            f = Finding(code, "warning", 0, 0, (), {}, cause, "")
            for init in ("he_init", "xavier_init", "orthogonal_init", "lsuv_init"):
                firsts.add(rank_remedies(f, init, facts=facts)[0].id)
    for remedy_id in sorted(firsts):
        _apply(remedy_id, make, batch, loss_fn)  # raises on a remedy that does not apply


def test_applicability_by_model(tmp_path):
    facts = {n: model_facts(_train(*MODELS[n], tmp_path / n, steps=1)) for n in ("gpt", "encoder_post_ln", "deep_mlp")}
    ok = {n: {i for i, c in CATALOGUE.items() if c.applies(f)} for n, f in facts.items()}
    for transformer in ("gpt", "encoder_post_ln"):  # residual, embeddings + attention: keep their init
        assert not ok[transformer] & {"add_residual", "batch_norm", "zero_residual_init", "he_init",
                                      "xavier_init", "rnn_to_lstm", "layerwise_pretrain"}
    assert "pre_layer_norm" in ok["encoder_post_ln"] and "pre_layer_norm" not in ok["gpt"]
    assert {"add_residual", "batch_norm", "relu", "he_init", "layerwise_pretrain"} <= ok["deep_mlp"]
    assert "pre_layer_norm" not in ok["deep_mlp"] and "rnn_to_lstm" not in ok["deep_mlp"]


def test_post_ln_vanishing_ranks_warmup_and_pre_ln_first(tmp_path):
    facts = model_facts(_train(*MODELS["encoder_post_ln"], tmp_path / "run", steps=1))
    for code in ("vanishing_gradient", "loss_not_decreasing"):
        for cause in ("unknown", "depth", "architecture"):
            got = [r.id for r in rank_remedies(Finding(code, "warning", 0, 0, (), {}, cause, ""), facts=facts)]
            assert got[:2] == ["lr_warmup", "pre_layer_norm"], (code, cause, got)
    assert ("vanishing_gradient", "architecture") in _RANKING


def test_lr_warmup_is_the_analytic_linear_warmup():
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([w, nn.Parameter(torch.zeros(1))], lr=3e-3)
    opt.param_groups[0]["lr"] = 3e-3
    sched = gd.treat.lr_warmup(opt, warmup_steps=8)
    for step in range(12):
        assert math.isclose(opt.param_groups[0]["lr"], 3e-3 * min(1.0, (step + 1) / 8), rel_tol=1e-12)
        opt.step()
        sched.step()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="warmup_steps"):
            gd.treat.lr_warmup(opt, bad)
