"""Initialization scale: weights too large for their fan-in, embeddings that swamp the residual stream,
and a language model whose step-0 loss is far above ln(vocab).

Signal propagation: a weight matrix of RMS s and fan-in n multiplies its input's RMS by about
s * sqrt(n) (Glorot & Bengio 2010, eq. 10; He et al. 2015); Xavier/LeCun is 1, He 1.41, PyTorch's
Linear default 0.58 and GPT-2's N(0, 0.02) at width 768 is 0.55. In a pre-LN transformer the
LayerNorms hide this from the activations, but not from the logits: with N(0, 1) weights the
initial logits are large, the prediction confident and wrong, and the step-0 loss far above
ln(vocab), the loss of a uniform prediction, where a well-initialised language model starts.

Reads the run's first weight sample (shapes, norms) and first loss: no activation statistics needed.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..core._layers import EMBEDDING_NAMES
from ._config import DiagnoseConfig
from ._data import RunData
from ._evidence import _r
from ._findings import Finding


def uniform_loss_level(d: RunData) -> Optional[float]:
    """ln(vocab) when the run is a language model (an embedding of V rows and an output layer of V
    features, or a head tied to the embedding: a Linear module that owns no tensor), else None."""
    emb = [i for i in range(d.P) if d.module_class(d.tensor_module[i]) in EMBEDDING_NAMES
           and len(d.tensor_shape[i]) == 2]
    if not emb:
        return None
    vocab = max(int(d.tensor_shape[i][0]) for i in emb)
    owners = set(d.tensor_module)
    head = any(d.module_class(d.tensor_module[i]) == "Linear" and len(d.tensor_shape[i]) == 2
               and int(d.tensor_shape[i][0]) == vocab for i in range(d.P))
    tied = any(c == "Linear" and m not in owners for m, c in d.modules.items())
    return math.log(vocab) if vocab > 1 and (head or tied) else None


def weight_gains(d: RunData) -> dict[str, float]:
    """RMS * sqrt(fan_in) of each judged weight matrix at the first weight sample (input side first)."""
    rms = d.initial_weight_rms
    out = {}
    for i in d.eligible:
        shape = d.tensor_shape[int(i)]
        fan_in = int(np.prod(shape[1:]))
        out[d.tensors[int(i)]] = float(rms[int(i)] * math.sqrt(fan_in))
    return out


def _first_loss(d: RunData) -> float:
    """The run's first finite loss (NaN when none)."""
    loss = d.loss[d.given]
    finite = loss[np.isfinite(loss)]
    return float(finite[0]) if len(finite) else float("nan")


def init_scale(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """Weights too large for their fan-in, oversized embeddings, or an LM's step-0 loss far above ln(vocab)."""
    if len(d.sample_steps) == 0 or int(d.sample_steps[0]) > cfg.init_max_step:
        return None  # the first weight sample must describe the initialization
    gains = weight_gains(d)
    finite = [g for g in gains.values() if math.isfinite(g)]
    median_gain = float(np.median(finite)) if finite else float("nan")
    rms = d.initial_weight_rms
    big_emb = {d.tensors[i]: float(rms[i]) for i in range(d.P)
               if d.module_class(d.tensor_module[i]) in EMBEDDING_NAMES and rms[i] > cfg.init_embed_rms_high}
    uniform, loss0 = uniform_loss_level(d), _first_loss(d)
    loss_high = (uniform is not None and d.T > 0 and int(d.steps[0]) <= cfg.init_max_step
                 and loss0 > cfg.init_loss_factor * uniform)
    reasons = []
    if median_gain > cfg.init_gain_high:
        reasons.append(f"weights are large for their fan-in (median RMS x sqrt(fan_in) = {median_gain:.3g} over "
                       f"{len(finite)} weight matrices; Xavier is 1, He 1.41, above {cfg.init_gain_high} is too large)")
    if big_emb:
        reasons.append(f"embedding RMS {max(big_emb.values()):.3g} (above {cfg.init_embed_rms_high}; PyTorch's "
                       "default is 1, GPT-2's 0.02): it swamps the residual stream")
    if loss_high and uniform is not None:
        reasons.append(f"the step-0 loss {loss0:.3g} is {loss0 / uniform:.2g}x ln(vocab) = {uniform:.3g}, the loss "
                       "of a uniform prediction: the initial logits are large and confidently wrong")
    if not reasons:
        return None
    top = sorted((n for n, g in gains.items() if math.isfinite(g)), key=lambda n: -gains[n])
    layers = tuple(sorted(big_emb, key=lambda n: -big_emb[n])) + tuple(top[:5] if median_gain > cfg.init_gain_high
                                                                       else ())
    ev = {"median_weight_gain": _r(median_gain), "weight_gain_per_layer": {n: _r(gains[n]) for n in top[:8]},
          "embedding_rms": {n: _r(v) for n, v in big_emb.items()}, "step0_loss": _r(loss0),
          "uniform_loss_ln_vocab": _r(uniform) if uniform is not None else None,
          "weight_sample_step": int(d.sample_steps[0]), "reasoning": "; ".join(reasons)}
    msg = f"The initialization is too large: {reasons[0]}."
    return Finding("poor_initialization", "warning", int(d.sample_steps[0]), int(d.sample_steps[0]), layers, ev,
                   "initialization", msg)
