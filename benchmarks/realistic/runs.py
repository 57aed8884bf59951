"""The realistic suite's runs and their labels, in one place.

Each `RunSpec` builds a model people train (see models.py), its optimizer and its data for a seed, says how
its loop runs (`loop`: plain, truncated BPTT with a carried detached hidden state, or a GradScaler that is not
passed to watch) and carries a `Label`: what a correct diagnosis says.

A label's `codes` are the finding codes that name the failure: the diagnosis is right on the code when it
reports one of them at warning or above (empty: a healthy run, which must get no warning at all).
`causes` and `remedies` are the acceptable causes and first remedies of the headline finding (the first
finding at warning or above, as `gd.diagnose` orders them); where more than one is right, `why` says why.
`allow` lists codes that are true of the run but not its point (reported, they are not a false alarm).
Remedy ids are the catalogue's (`graddoctor/treat/_catalogue.py`); ids issue 16 asks for that the catalogue
does not have yet (`lr_warmup`, `pre_layer_norm`, `pass_scaler`) are named as the issue names them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import data, models

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Setup:
    """What one run trains: a fresh model, its optimizer, its data and an optional per-step LR schedule."""

    model: nn.Module
    opt: torch.optim.Optimizer
    batches: Batches
    lr_at: Optional[Callable[[int], float]] = None  # step -> learning rate (None: constant)


@dataclass(frozen=True)
class Label:
    codes: frozenset[str] = frozenset()
    causes: frozenset[str] = frozenset()
    remedies: frozenset[str] = frozenset()
    allow: frozenset[str] = frozenset()
    why: str = ""

    @property
    def healthy(self) -> bool:
        return not self.codes


@dataclass(frozen=True)
class RunSpec:
    name: str
    arch: str
    build: Callable[[int], Setup]
    label: Label
    seed: int = 0
    steps: int = 200
    loop: str = "plain"  # "plain" | "bptt" | "scaler"
    watch: dict[str, Any] = field(default_factory=dict)


HEALTHY = Label(why="a standard recipe for this model; the loss falls steadily")


def _fs(*xs: str) -> frozenset[str]:
    return frozenset(xs)


# ------------------------------------------------------------------ builders
def _gpt(lr: float = 3e-3, init_std: float = 0.02, embed_scale: float = 1.0, n_layer: int = 4,
         lr_at: Optional[Callable[[int], float]] = None, qk_norm: bool = False,
         weight_decay: float = 0.1) -> Callable[[int], Setup]:
    def build(seed: int) -> Setup:
        torch.manual_seed(seed)
        model = models.GPT(n_layer=n_layer, init_std=init_std, qk_norm=qk_norm)
        with torch.no_grad():
            model.transformer.wte.weight.mul_(embed_scale)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        return Setup(model, opt, data.lm_windows(seed), lr_at)
    return build


def _encoder(norm_first: bool, n_layer: int = 2, lr: float = 1e-3, warmup: int = 0) -> Callable[[int], Setup]:
    def build(seed: int) -> Setup:
        torch.manual_seed(seed)
        model = models.EncoderLM(n_layer=n_layer, norm_first=norm_first)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        lr_at = (lambda step: lr * min(1.0, (step + 1) / warmup)) if warmup else None
        return Setup(model, opt, data.lm_windows(seed), lr_at)
    return build


def _hf(lr: float = 3e-3) -> Callable[[int], Setup]:
    def build(seed: int) -> Setup:
        torch.manual_seed(seed)
        model = models.hf_gpt2()
        if model is None:
            raise ModuleNotFoundError("transformers is not installed")
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        return Setup(model, opt, data.lm_windows(seed))
    return build


def _recurrent(cell: str = "lstm", lr: float = 3e-3, recurrent_gain: float = 0.0,
               nonlinearity: str = "tanh") -> Callable[[int], Setup]:
    def build(seed: int) -> Setup:
        torch.manual_seed(seed)
        model = models.RecurrentLM(cell=cell, nonlinearity=nonlinearity)
        if recurrent_gain:  # large recurrent init: W_hh = gain x an orthogonal matrix (spectral radius = gain)
            with torch.no_grad():
                nn.init.orthogonal_(model.rnn.weight_hh_l0, gain=recurrent_gain)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        return Setup(model, opt, data.lm_streams())
    return build


def _cnn(act: type[nn.Module] = nn.ReLU, lr: float = 1e-3, conv_bias: Optional[float] = None,
         conv_weight_scale: float = 1.0, nan_at: Optional[int] = None) -> Callable[[int], Setup]:
    def build(seed: int) -> Setup:
        torch.manual_seed(seed)
        model = models.DigitsCNN(act)
        with torch.no_grad():
            for m in model.features:
                if isinstance(m, nn.Conv2d):
                    m.weight.mul_(conv_weight_scale)
                    if conv_bias is not None:
                        m.bias.fill_(conv_bias)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        return Setup(model, opt, data.digit_batches(seed, nan_at=nan_at))
    return build


def _spike(base: float, at: int, length: int, factor: float) -> Callable[[int], float]:
    return lambda step: base * factor if at <= step < at + length else base


def _warmup(peak: float, steps: int) -> Callable[[int], float]:
    """Linear warmup to `peak` over `steps` steps, then constant (nanoGPT's warmup, without the decay)."""
    return lambda step: peak * min(1.0, (step + 1) / steps)


# ------------------------------------------------------------------ the runs
DIVERGE = Label(_fs("exploding_gradient", "loss_spike", "nonfinite_gradient"), _fs("learning_rate"),
                _fs("lower_learning_rate", "lr_warmup", "clip_norm"),
                allow=_fs("large_weight_update", "loss_not_decreasing", "input_outlier", "attention_logit_growth"),
                why="the learning rate is far too high: the loss diverges. Lowering it is the cure; warmup and "
                    "norm clipping are the usual guards against this in transformers. At LR 1.0 the attention "
                    "logits of a GPT grow too (to ~7e3 by step 25): true, but not the point")
BAD_INIT = Label(_fs("poor_initialization", "exploding_gradient"), _fs("initialization"),
                 _fs("gpt2_init", "xavier_init", "lsuv_init"),
                 allow=_fs("loss_spike", "large_weight_update", "nonfinite_gradient", "saturated_activation"),
                 why="weights ~50x their usual scale: logits and loss start far above ln(vocab). The cure is the "
                     "model's own init: GPT-2's N(0, 0.02) with scaled residual projections (gpt2_init); an init "
                     "that restores ~1/sqrt(fan_in) (Xavier, LSUV) is acceptable; he_init is not for these "
                     "GELU+LN blocks")

RUNS: list[RunSpec] = [
    # nanoGPT-style GPT on argparse.py characters
    RunSpec("gpt_healthy_s0", "gpt", _gpt(), HEALTHY),
    RunSpec("gpt_healthy_s1", "gpt", _gpt(), HEALTHY, seed=1),
    RunSpec("gpt_lr_high", "gpt", _gpt(lr=1.0), DIVERGE),
    RunSpec("gpt_init_std1", "gpt", _gpt(init_std=1.0), BAD_INIT),
    RunSpec("gpt_embed_x100", "gpt", _gpt(embed_scale=100.0), BAD_INIT),
    RunSpec("gpt_lr_spike", "gpt", _gpt(lr_at=_spike(3e-3, 120, 5, 100.0)),
            Label(_fs("loss_spike", "exploding_gradient", "large_weight_update"), _fs("learning_rate"),
                  _fs("lower_learning_rate", "rollback", "clip_norm", "zclip"),
                  allow=_fs("loss_not_decreasing", "attention_logit_growth"),
                  why="a schedule bug multiplies the LR by 100 for 5 steps at step 120: the loss spikes. A lower "
                      "LR removes it; rollback, norm clipping or z-score clipping contain the spike. The attention "
                      "logits jump to ~2.5e3 during the spike: true of the run, not its point")),
    RunSpec("gpt_attn_logit_growth", "gpt", _gpt(lr=0.05, lr_at=_warmup(0.05, 100)), Label(
        _fs("attention_logit_growth"), _fs("learning_rate"), _fs("qk_norm", "lower_learning_rate"),
        allow=_fs("large_weight_update", "loss_spike"),
        why="nanoGPT's recipe at a peak LR of 0.05 (warmup over 100 steps): the max attention logit |q.k|/sqrt(d) "
            "grows from 0.1 to 80-130 (seeds 0-2), where the softmax is one-hot (Wortsman et al. 2023). "
            "QK-layernorm (Dehghani et al. 2023) holds it below 10 at the same LR (gpt_attn_qk_norm); a lower LR "
            "also avoids it"), watch={"activation_every": 10}),
    RunSpec("gpt_attn_qk_norm", "gpt", _gpt(lr=0.05, lr_at=_warmup(0.05, 100), qk_norm=True), Label(
        why="the QK-norm twin of gpt_attn_logit_growth (same LR and warmup): the max attention logit stays "
            "below 10 and nothing is wrong"), watch={"activation_every": 10}),
    RunSpec("gpt_amp_no_scaler", "gpt", _gpt(), Label(
        _fs("exploding_gradient", "poor_initialization"), _fs("mixed_precision"), _fs("pass_scaler"),
        why="a GradScaler (scale 2**16) is used but not passed to watch: the recorded gradients are 2**16 too "
            "large from step 0. The run itself is healthy; the cause is the mixed-precision set-up and the cure "
            "is watch(..., scaler=scaler) (pass_scaler), not an architecture change"), loop="scaler"),
    # nn.TransformerEncoder LM, pre-LN and post-LN
    RunSpec("enc_preln_healthy_s0", "encoder", _encoder(True, n_layer=4), HEALTHY),
    RunSpec("enc_preln_healthy_s1", "encoder", _encoder(True, n_layer=4), HEALTHY, seed=1),
    RunSpec("enc_postln_healthy", "encoder", _encoder(False, n_layer=2), HEALTHY),
    RunSpec("enc_postln12_nowarmup", "encoder", _encoder(False, n_layer=12, lr=1e-2), Label(
        _fs("vanishing_gradient", "loss_not_decreasing", "exploding_gradient"),
        _fs("architecture", "learning_rate", "depth"),
        _fs("lr_warmup", "pre_layer_norm"), allow=_fs("loss_spike", "large_weight_update", "dead_relu"),
        why="post-LN at 12 layers with Adam 1e-2 and no warmup (Xiong et al. 2020): the loss stalls near 2.9 "
            "where the pre-LN twin reaches 2.1. The known cures are warmup and pre-LN; the cause is the post-LN "
            "placement under this LR: architecture, learning_rate or depth are accepted"), steps=120),
    RunSpec("enc_preln12_healthy", "encoder", _encoder(True, n_layer=12, lr=1e-2), Label(
        why="the pre-LN twin of enc_postln12_nowarmup (same depth and LR): the Xiong et al. cure, trains well"),
        steps=120),
    # Hugging Face GPT-2 from a config
    RunSpec("hf_gpt2_healthy_s0", "hf_gpt2", _hf(), HEALTHY),
    RunSpec("hf_gpt2_healthy_s1", "hf_gpt2", _hf(), HEALTHY, seed=1),
    RunSpec("hf_gpt2_lr_high", "hf_gpt2", _hf(lr=1.0), DIVERGE),
    # LSTM / RNN language models with truncated BPTT
    RunSpec("lstm_healthy_s0", "lstm", _recurrent(), HEALTHY, loop="bptt"),
    RunSpec("lstm_healthy_s1", "lstm", _recurrent(), HEALTHY, seed=1, loop="bptt"),
    RunSpec("rnn_tanh_exploding", "rnn", _recurrent("rnn", recurrent_gain=4.0), Label(
        _fs("exploding_gradient"), _fs("recurrence", "initialization"),
        _fs("rnn_to_lstm", "orthogonal_init", "clip_norm"),
        allow=_fs("loss_spike", "large_weight_update", "poor_initialization", "loss_not_decreasing",
                  "saturated_activation"),
        why="a tanh RNN whose recurrent matrix has spectral radius 4, no clipping: gradient norms of 1e4 and a "
            "loss stuck near 3.0 (the LSTM reaches 1.7). Gated cells, an orthogonal (gain 1) recurrent init or "
            "norm clipping are the textbook cures; recurrence and initialization are both true causes"),
        loop="bptt"),
    RunSpec("rnn_relu_nan", "rnn", _recurrent("rnn", recurrent_gain=2.5, nonlinearity="relu"), Label(
        _fs("exploding_gradient", "nonfinite_gradient"), _fs("recurrence", "initialization"),
        _fs("rnn_to_lstm", "orthogonal_init", "clip_norm"),
        allow=_fs("loss_spike", "large_weight_update", "poor_initialization", "loss_not_decreasing"),
        why="a ReLU RNN with recurrent spectral radius 2.5: the carried hidden state overflows to Inf/NaN by "
            "step 3. The inputs are clean token ids, so input_outlier (blaming the data for the model's own "
            "hidden state) is a false alarm. Cures as for rnn_tanh_exploding"), loop="bptt"),
    RunSpec("lstm_lr_high", "lstm", _recurrent(lr=0.5), Label(
        DIVERGE.codes, DIVERGE.causes, _fs("lower_learning_rate", "clip_norm"),
        allow=DIVERGE.allow | _fs("vanishing_gradient", "saturated_activation"),
        why="an LSTM LM with Adam at LR 0.5: the loss blows up. Lower LR, or norm clipping as every LSTM LM "
            "recipe does; not vanishing, and not the hidden state blamed on the data"), loop="bptt"),
    # a small CNN on scikit-learn's digits
    RunSpec("cnn_healthy_s0", "cnn", _cnn(), HEALTHY),
    RunSpec("cnn_healthy_s1", "cnn", _cnn(), HEALTHY, seed=1),
    RunSpec("cnn_dead_relu", "cnn", _cnn(conv_bias=-10.0), Label(
        _fs("dead_relu"), _fs("initialization", "activation"), _fs("he_init", "leaky_relu", "elu"),
        allow=_fs("vanishing_gradient", "loss_not_decreasing", "poor_initialization"),
        why="conv biases initialised to -10: every ReLU is off for inputs in [0, 1]. He init (which zeroes the "
            "biases) or an activation without a dead region revive them")),
    RunSpec("cnn_sigmoid_saturated", "cnn", _cnn(nn.Sigmoid, conv_weight_scale=10.0), Label(
        _fs("saturated_activation", "vanishing_gradient"), _fs("activation", "initialization"),
        _fs("relu", "xavier_init", "batch_norm", "leaky_relu", "elu"),
        allow=_fs("loss_not_decreasing", "poor_initialization"),
        why="sigmoid convolutions with weights 10x PyTorch's default: the units sit at 0 or 1. Swapping the "
            "activation, Xavier init or BatchNorm each take them out of saturation")),
    RunSpec("cnn_nan_data", "cnn", _cnn(nan_at=100), Label(
        _fs("nonfinite_gradient", "input_outlier"), _fs("data"), _fs("sanitize_inputs", "skip_nonfinite"),
        allow=_fs("loss_spike", "exploding_gradient", "large_weight_update", "loss_not_decreasing"),
        why="one pixel of the batch at step 100 is NaN: the gradient and, after Adam's step, every weight turn "
            "NaN. Cleaning the inputs fixes the cause; skipping non-finite steps contains it")),
]

BY_NAME = {r.name: r for r in RUNS}
