"""The labelled table of small real training runs that diagnose is judged on.

Each `Scenario` trains a tiny model on the CPU (a second or two) under
`graddoctor.watch` and says which finding codes it must get (`expect`), which
it may get (`allow`: true of the run but not the point of it) and, by
omission, which it must not get. Shared by tests/test_diagnose_runs.py and
benchmarks/diagnose_compare.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import graddoctor as gd

ALL_CODES = ("vanishing_gradient", "exploding_gradient", "nonfinite_gradient", "loss_spike", "loss_not_decreasing",
             "saturated_activation", "dead_relu", "poor_initialization", "input_outlier", "large_weight_update",
             "attention_logit_growth", "output_logit_divergence")


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[], tuple[nn.Module, torch.optim.Optimizer, Callable[[int], tuple], Callable]]
    expect: frozenset = frozenset()
    allow: frozenset = frozenset()
    causes: dict = field(default_factory=dict)  # code -> expected cause
    steps: int = 150
    watch: dict = field(default_factory=dict)  # watch options this run needs

    @property
    def healthy(self) -> bool:
        return not self.expect

    @property
    def forbid(self) -> frozenset:
        return frozenset(ALL_CODES) - self.expect - self.allow


# ------------------------------------------------------------------ data
def _teacher_task(n_in=16, n_out=4, seed=0, n=1024):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    y = (x @ torch.randn(n_in, n_out, generator=g)).argmax(1)
    return x, y


def _batches(x, y, batch=64, tamper=None):
    # Minibatch order follows the global seed that `train` sets, so other seeds re-draw it too.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))

    def get(step):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb, yb = x[idx].clone(), y[idx]
        if tamper is not None:
            xb = tamper(step, xb)
        return (xb,), yb
    return get


def _ce(out, y):
    return nn.functional.cross_entropy(out, y)


def _mlp(depth, width, act, n_in=16, n_out=4, weight_init=None, bias_init=None):
    sizes = [n_in] + [width] * (depth - 1) + [n_out]
    layers = []
    for i in range(depth):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        if weight_init is not None:
            weight_init(lin.weight)
        if bias_init is not None:
            bias_init(lin.bias)
        layers.append(lin)
        if i < depth - 1 and act is not None:
            layers.append(act())
    return nn.Sequential(*layers)


def _mlp_run(depth, width, act, lr, opt="sgd", tamper=None, **init):
    def build():
        model = _mlp(depth, width, act, **init)
        x, y = _teacher_task()
        o = torch.optim.SGD(model.parameters(), lr=lr) if opt == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
        return model, o, _batches(x, y, tamper=tamper), _ce
    return build


# ------------------------------------------------------------- pathologies
def _normal(std):
    return lambda w: nn.init.normal_(w, 0.0, std)


def _outlier(step, xb):
    if step == 90:
        xb = xb * 1000.0
    return xb


def _nan(step, xb):
    if step == 90:
        xb[3, 5] = math.nan
    return xb


class _Seq(nn.Module):
    def __init__(self, kind, hidden, identity_scale=None):
        super().__init__()
        self.rnn = nn.RNN(4, hidden, batch_first=True, nonlinearity="relu") if kind == "rnn_relu" else \
            nn.LSTM(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        if identity_scale is not None:  # IRNN (Le et al. 2015): recurrent weight = identity
            with torch.no_grad():
                self.rnn.weight_hh_l0.copy_(torch.eye(hidden) * identity_scale)
                self.rnn.bias_hh_l0.zero_()

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _rnn_run(kind, hidden, seq, identity_scale, lr):
    def build():
        model = _Seq(kind, hidden, identity_scale)
        g = torch.Generator().manual_seed(3)
        x = torch.rand(512, seq, 4, generator=g) if kind == "rnn_relu" else torch.randn(512, seq, 4, generator=g)
        y = x[:, :, 0].mean(1, keepdim=True) + 0.5 * x[:, -1, 1:2]
        o = torch.optim.Adam(model.parameters(), lr=lr) if kind == "lstm" else torch.optim.SGD(model.parameters(), lr=lr)
        return model, o, _batches(x, y, batch=32), nn.functional.mse_loss
    return build


def _warmup_run(base_lr, growth):
    """A He-init LeakyReLU MLP whose learning rate grows every step (a warmup that never stops).
    LeakyReLU, so the run explodes instead of ending with every ReLU dead."""
    def build():
        model = _mlp(4, 32, nn.LeakyReLU, weight_init=_he, bias_init=nn.init.zeros_)
        x, y = _teacher_task()
        opt = torch.optim.SGD(model.parameters(), lr=base_lr)

        def schedule(step):
            for group in opt.param_groups:
                group["lr"] = base_lr * growth ** step
        return model, opt, _batches(x, y), _ce, schedule
    return build


# ------------------------------------------------------------- healthy nets
class _ResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.BatchNorm1d(width)
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)  # zero-initialised branch end (Goyal et al. 2017; Fixup)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class _ReZeroBlock(nn.Module):
    """x + alpha * branch(x) with alpha = 0 at init (Bachlechner et al. 2020): the branch gets no gradient at first."""

    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.alpha * self.fc2(self.act(self.fc1(x)))


def _rezero():
    model = nn.Sequential(nn.Linear(16, 32), *[_ReZeroBlock(32) for _ in range(8)], nn.Linear(32, 4))
    x, y = _teacher_task()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), _batches(x, y), _ce


def _resmlp():
    model = nn.Sequential(nn.Linear(16, 32), *[_ResBlock(32) for _ in range(8)], nn.BatchNorm1d(32), nn.Linear(32, 4))
    x, y = _teacher_task()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), _batches(x, y), _ce


class _TinyTransformer(nn.Module):
    """Predicts the most frequent token of a sequence (needs attention over the whole sequence)."""

    def __init__(self, vocab=8, d=16, seq=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))  # zero-initialised position table
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tok):
        return self.head(self.enc(self.emb(tok) + self.pos).mean(1))


def _transformer():
    model = _TinyTransformer()
    g = torch.Generator().manual_seed(4)
    tok = torch.randint(0, 8, (1024, 8), generator=g)
    y = torch.mode(tok, dim=1).values
    return model, torch.optim.Adam(model.parameters(), lr=3e-3), _batches(tok, y), _ce


def _cnn():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return model, torch.optim.Adam(model.parameters(), lr=3e-3), _batches(x, y), _ce


# ------------------------------------------------------------- language models
class _CausalSelfAttention(nn.Module):
    """nanoGPT's attention: q, k, v from one `c_attn` projection (what watch's attention signal hooks)."""

    def __init__(self, n_embd: int, n_head: int, qk_norm: bool):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        if qk_norm:  # QK-layernorm (Dehghani et al. 2023)
            self.q_norm, self.k_norm = nn.LayerNorm(n_embd // n_head), nn.LayerNorm(n_embd // n_head)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _GPTBlock(nn.Module):
    def __init__(self, n_embd, n_head, qk_norm):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = _CausalSelfAttention(n_embd, n_head, qk_norm)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _GPT(nn.Module):
    """A 2-layer nanoGPT-style pre-LN GPT, N(0, 0.02) init; the head makes `vocab` logits."""

    def __init__(self, vocab=32, n_embd=32, n_head=2, n_layer=2, T=16, qk_norm=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(T, n_embd)
        self.h = nn.ModuleList(_GPTBlock(n_embd, n_head, qk_norm) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        return self.head(self.ln_f(x))


def _lm_ce(out, y):
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


def _gpt_run(lr, qk_norm=False, vocab=32, T=16):
    """Copy the previous token of random token windows, AdamW without weight decay."""
    def build():
        model = _GPT(vocab=vocab, T=T, qk_norm=qk_norm)
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))

        def get(step):
            x = torch.randint(0, vocab, (8, T), generator=g)
            return (x,), torch.roll(x, 1, 1)
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), get, _lm_ce
    return build


class _Bigram(nn.Module):
    """A bigram language model: the logits of the next token are a learned row per current token
    (an embedding and a linear head with a bias)."""

    def __init__(self, vocab, d):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tok):
        return self.head(self.wte(tok))


def _bigram_run(lr, vocab=64, d=32, opt="adam"):
    """Text in which every token has exactly one successor (a fixed permutation), so the loss can reach 0.

    Nothing in the loss holds log Z: cross-entropy sees only differences of logits. With Adam at lr 0.3 each
    weight moves by about the lr per step whatever the size of its gradient, so once the table is learnt
    the winning logit keeps climbing (to ~70 by step 30) while the mean logit over the vocabulary stays near
    0, until float32 rounds the gradients away: log Z = the winning logit drifts from ln(64) = 4.2 past 50.
    Plain SGD takes steps in proportion to those vanishing gradients and keeps log Z below 10."""
    def build():
        model = _Bigram(vocab, d)
        g = torch.Generator().manual_seed(5)
        succ = torch.randperm(vocab, generator=g)
        tok = torch.randint(0, vocab, (1024,), generator=g)
        o = torch.optim.Adam(model.parameters(), lr=lr) if opt == "adam" else torch.optim.SGD(model.parameters(), lr=lr)
        return model, o, _batches(tok, succ[tok]), _ce
    return build


def _he(w):
    nn.init.kaiming_normal_(w, nonlinearity="relu")


S = Scenario
fs = frozenset
SCENARIOS: list[Scenario] = [
    S("deep_sigmoid", _mlp_run(10, 32, nn.Sigmoid, lr=0.1), fs({"vanishing_gradient", "loss_not_decreasing"}),
      fs(), {"vanishing_gradient": "activation", "loss_not_decreasing": "activation"}),
    S("large_init_tanh", _mlp_run(6, 32, nn.Tanh, lr=0.01, weight_init=_normal(1.0)),
      fs({"saturated_activation", "poor_initialization"}), fs({"exploding_gradient", "loss_not_decreasing", "loss_spike"}),
      {"saturated_activation": "initialization", "poor_initialization": "initialization"}),
    S("large_init_relu", _mlp_run(6, 32, nn.ReLU, lr=0.01, weight_init=_normal(1.0)),
      fs({"exploding_gradient", "poor_initialization"}),
      fs({"nonfinite_gradient", "large_weight_update", "loss_spike", "loss_not_decreasing"}),
      {"exploding_gradient": "initialization", "poor_initialization": "initialization"}),
    S("xavier_relu_30", _mlp_run(30, 32, nn.ReLU, lr=0.05, weight_init=nn.init.xavier_normal_, bias_init=nn.init.zeros_),
      fs({"vanishing_gradient", "poor_initialization"}), fs({"loss_not_decreasing", "dead_relu"}),
      {"vanishing_gradient": "initialization", "poor_initialization": "initialization"}),
    S("small_init_deep_linear", _mlp_run(12, 32, None, lr=0.05, weight_init=_normal(0.02)),
      fs({"vanishing_gradient", "poor_initialization", "loss_not_decreasing"}), fs(),
      {"vanishing_gradient": "initialization", "poor_initialization": "initialization",
       "loss_not_decreasing": "initialization"}),
    S("dead_relu_bias", _mlp_run(5, 32, nn.ReLU, lr=0.05, weight_init=_he, bias_init=lambda b: nn.init.constant_(b, -4.0)),
      fs({"dead_relu"}), fs({"poor_initialization", "loss_not_decreasing", "vanishing_gradient"}),
      {"dead_relu": "initialization"}),
    S("exploding_relu_rnn", _rnn_run("rnn_relu", 32, 50, 1.0, lr=0.01), fs({"exploding_gradient", "nonfinite_gradient"}),
      fs({"loss_spike", "large_weight_update", "loss_not_decreasing", "poor_initialization"}),
      {"exploding_gradient": "recurrence"}),
    S("lr_too_high", _warmup_run(0.02, 1.05),
      fs({"exploding_gradient", "large_weight_update"}), fs({"nonfinite_gradient", "loss_spike", "loss_not_decreasing"}),
      {"exploding_gradient": "learning_rate", "large_weight_update": "learning_rate"},
      watch={"sample_every": 2}),  # update/weight ratios every 2 steps: the blow-up takes only ~20
    S("outlier_batch", _mlp_run(3, 32, nn.ReLU, lr=3e-3, opt="adam", tamper=_outlier),
      fs({"input_outlier", "loss_spike"}), fs(), {"input_outlier": "data", "loss_spike": "data"}),
    S("nan_batch", _mlp_run(3, 32, nn.ReLU, lr=3e-3, opt="adam", tamper=_nan),
      fs({"nonfinite_gradient", "input_outlier"}), fs({"loss_not_decreasing"}), {"nonfinite_gradient": "data"}),
    S("healthy_resmlp_bn", _resmlp),
    S("healthy_transformer", _transformer),
    S("healthy_rezero_mlp", _rezero),
    S("healthy_lstm", _rnn_run("lstm", 32, 20, None, lr=3e-3)),
    S("healthy_cnn", _cnn),
    S("healthy_slow_sgd", _mlp_run(3, 32, nn.Tanh, lr=0.01)),
    S("healthy_deep_relu_he", _mlp_run(12, 32, nn.ReLU, lr=0.02, weight_init=_he, bias_init=nn.init.zeros_)),
    # AdamW at lr 0.1 without QK-norm: the max attention logit grows from ~0.1 to hundreds in 30 steps
    # (Wortsman et al. 2023); the same run with QK-norm stays below 10 but still takes large updates.
    # lr 0.1 also blows the loss up to ~2.3x the uniform guess ln(V) at step 4: an early loss_spike is true too
    S("gpt_attention_logit_growth", _gpt_run(0.1), fs({"attention_logit_growth"}),
      fs({"large_weight_update", "loss_spike"}),
      {"attention_logit_growth": "learning_rate"}, steps=30, watch={"activation_every": 5}),
    S("gpt_qk_norm_high_lr", _gpt_run(0.1, qk_norm=True), fs({"large_weight_update"}), fs({"loss_not_decreasing"}),
      {"large_weight_update": "learning_rate"}, steps=30, watch={"activation_every": 5}),
    S("bigram_logit_divergence", _bigram_run(0.3), fs({"output_logit_divergence"}), fs({"large_weight_update"}),
      {"output_logit_divergence": "learning_rate"}, watch={"activation_every": 10}),
    S("healthy_gpt", _gpt_run(3e-3), watch={"activation_every": 10}),
    S("healthy_bigram_sgd", _bigram_run(1.0, opt="sgd"), watch={"activation_every": 10}),
]
del S, fs


def train(scenario: Scenario, run_dir: str | Path, seed: int = 0, **watch_options) -> Path:
    """Train one scenario under watch into run_dir; returns run_dir. NaN/Inf losses are recorded, never raised.

    Runs on one intra-op thread: these models are tiny, and on a shared 2-core box a second
    spinning thread only slows everyone down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model, opt, batches, loss_fn, *schedule = scenario.build()
        with gd.watch(model, opt, run_dir, **{**scenario.watch, **watch_options}) as w:
            for step in range(scenario.steps):
                if schedule:
                    schedule[0](step)
                inputs, target = batches(step)
                loss = loss_fn(model(*inputs), target)
                opt.zero_grad()
                loss.backward()
                w.step(loss)
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return Path(run_dir)


def by_name(name: str) -> Scenario:
    return next(s for s in SCENARIOS if s.name == name)
