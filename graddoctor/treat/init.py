"""Initialization schemes that keep the signal (and so the gradient) at scale 1 through depth.

    gd.init.he_(model)            # gain chosen per layer from the activation that follows it
    gd.init.lsuv_(model, x_batch) # orthonormal, then each layer rescaled to unit output variance

Each function works in place on every Linear / Conv layer of the model (recurrent layers
for `orthogonal_`), zeroes the biases, and returns a list of what it did, one line per layer.

Which activation follows a layer is read from the module order (`model.modules()`): the
first activation module after the layer and before the next weight layer. Activations
called as functions inside `forward` are invisible; pass `nonlinearity=` then. Gains are
`torch.nn.init.calculate_gain(name)`; ELU, GELU, SiLU and Softplus have no entry there
and get ReLU's gain (they are ReLU-like for positive inputs). A layer with no activation
after it (the output layer) gets gain 1 ("linear").

References:
  Glorot, Bengio, "Understanding the difficulty of training deep feedforward neural networks", AISTATS 2010.
  He, Zhang, Ren, Sun, "Delving Deep into Rectifiers", ICCV 2015. https://arxiv.org/abs/1502.01852
  Saxe, McClelland, Ganguli, "Exact solutions to the nonlinear dynamics of learning in deep linear networks",
    ICLR 2014. https://arxiv.org/abs/1312.6120
  Mishkin, Matas, "All you need is a good init", ICLR 2016. https://arxiv.org/abs/1511.06422
  Zhang, Dauphin, Ma, "Fixup Initialization", ICLR 2019; Bachlechner et al., "ReZero is All You Need", 2020.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union, cast

import torch
from torch import Tensor, nn

from .._errors import GradDoctorError
from ..core._layers import RECURRENT, WEIGHT_LAYERS, Residual, activation_name


class NoLayersError(GradDoctorError):
    """The model has no layer this initialization applies to."""


WeightLayer = Union[nn.Linear, nn.modules.conv._ConvNd]  # the classes of WEIGHT_LAYERS
# (name, layer, calculate_gain name of the activation after it, that gain's parameter)
LayerInfo = tuple[str, WeightLayer, str, float]


def layers_with_activation(model: nn.Module) -> list[LayerInfo]:
    """Every weight layer in module order, with the activation that follows it ("linear" if none)."""
    out: list[LayerInfo] = []
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_LAYERS):
            out.append((name, m, "linear", 0.0))
        elif out and out[-1][2] == "linear" and (act := activation_name(m)) is not None:
            out[-1] = (out[-1][0], out[-1][1], act[0], act[1])  # only the first activation after a layer counts
    return out


def _gain(nonlinearity: str, param: Optional[float] = None) -> float:
    """`nn.init.calculate_gain`; it raises ValueError naming the allowed names for any other string."""
    return nn.init.calculate_gain(cast(Any, nonlinearity), param)  # its stub takes only a Literal of the names


def _layers(model: nn.Module, nonlinearity: Optional[str]) -> list[LayerInfo]:
    layers = layers_with_activation(model)
    if not layers:
        raise NoLayersError(f"{type(model).__name__} has no Linear or Conv layer to initialize")
    if nonlinearity is not None:
        _gain(nonlinearity)  # raises ValueError naming the allowed names
        layers = [(n, m, nonlinearity, 0.01 if nonlinearity == "leaky_relu" else 0.0) for n, m, _, _ in layers]
    return layers


def _zero_bias(m: nn.Module) -> None:
    bias = getattr(m, "bias", None)
    if isinstance(bias, Tensor):
        nn.init.zeros_(bias)


@torch.no_grad()
def he_(model: nn.Module, mode: Literal["fan_in", "fan_out"] = "fan_in",
        nonlinearity: Optional[str] = None) -> list[str]:
    """He (Kaiming) normal init: std = gain / sqrt(fan), gain from the following activation.

    Args:
      model: initialized in place.
      mode: "fan_in" (keeps the forward signal) or "fan_out" (keeps the backward signal).
      nonlinearity: force one `calculate_gain` name for every layer instead of reading the module order.
    Returns:
      One line per layer: name, activation, std.
    """
    done = []
    for name, m, act, param in _layers(model, nonlinearity):
        nn.init.kaiming_normal_(m.weight, a=param, mode=mode, nonlinearity=cast(Any, act))  # act: a gain name
        _zero_bias(m)
        done.append(f"{name}: he ({act}) std={float(m.weight.std()):.4g}")
    return done


@torch.no_grad()
def xavier_(model: nn.Module, nonlinearity: Optional[str] = None) -> list[str]:
    """Xavier (Glorot) normal init: std = gain * sqrt(2 / (fan_in + fan_out)).

    Returns:
      One line per layer: name, activation, std.
    """
    done = []
    for name, m, act, param in _layers(model, nonlinearity):
        nn.init.xavier_normal_(m.weight, gain=_gain(act, param))
        _zero_bias(m)
        done.append(f"{name}: xavier ({act}) std={float(m.weight.std()):.4g}")
    return done


@torch.no_grad()
def orthogonal_(model: nn.Module, nonlinearity: Optional[str] = None) -> list[str]:
    """Orthogonal init (scaled by the activation's gain); recurrent hidden-to-hidden matrices get
    one orthogonal block per gate, so repeated multiplication over time preserves norms.

    Returns:
      One line per layer.
    """
    done = []
    layers = layers_with_activation(model)
    for name, m, act, param in layers:
        nn.init.orthogonal_(m.weight, gain=_gain(nonlinearity or act, param))
        _zero_bias(m)
        done.append(f"{name}: orthogonal ({nonlinearity or act})")
    for name, m in model.named_modules():
        if isinstance(m, RECURRENT):
            for pname, p in m.named_parameters():
                if pname.startswith("weight_hh"):
                    for block in p.split(m.hidden_size, dim=0):  # one block per gate
                        nn.init.orthogonal_(block)
                elif pname.startswith("weight_ih"):
                    nn.init.xavier_uniform_(p)
                elif pname.startswith("bias"):
                    nn.init.zeros_(p)
            done.append(f"{name}: orthogonal recurrent ({type(m).__name__})")
    if not done:
        raise NoLayersError(f"{type(model).__name__} has no Linear, Conv or recurrent layer to initialize")
    return done


@torch.no_grad()
def lsuv_(model: nn.Module, x: Tensor, tol: float = 0.1, max_iter: int = 10) -> list[str]:
    """Layer-sequential unit-variance init (Mishkin & Matas): orthonormal weights, then, layer by
    layer from the input, divide the weights by the std of the layer's output on the batch `x`
    until the variance is within `tol` of 1 (at most `max_iter` rescalings per layer).

    Args:
      model: initialized in place; it is run forward on `x` (in eval mode, restored afterwards).
      x: one batch of real inputs (a few hundred examples is plenty).
      tol: allowed |variance - 1|.
      max_iter: rescalings per layer.
    Returns:
      One line per layer with the final output variance.
    """
    layers = _layers(model, None)
    for _, m, _, _ in layers:
        nn.init.orthogonal_(m.weight)
        _zero_bias(m)
    was_training = model.training
    model.eval()
    done = []
    try:
        for name, m, _, _ in layers:
            var, it = _output_var(model, m, x), 0
            if var is None:  # e.g. MultiheadAttention's out_proj, applied as a function, or a fused fast path
                done.append(f"{name}: lsuv skipped (its forward is not called as a module; left orthonormal)")
                continue
            while var is not None and abs(var - 1.0) > tol and it < max_iter and var > 0:
                m.weight.div_(math.sqrt(var))
                var, it = _output_var(model, m, x), it + 1
            done.append(f"{name}: lsuv variance={var:.4f} after {it} rescaling(s)")
    finally:
        model.train(was_training)
    return done


def _output_var(model: nn.Module, layer: nn.Module, x: Tensor) -> Optional[float]:
    """Variance of `layer`'s output on one forward pass of `x`, or None when the forward never calls the
    layer as a module (its weight used by a function, or a fused path). note: a host sync (init time)."""
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.enable_grad():  # PyTorch's transformer layers take a fused path, skipping hooks, without grad
            model(x)
    finally:
        handle.remove()
    return float(seen[0].float().var()) if seen else None


@torch.no_grad()
def zero_residual_(model: nn.Module) -> list[str]:
    """Start every residual branch at zero, so each block is the identity (Fixup / ReZero style).

    Finds branches of `graddoctor.treat.surgery.Residual` (zeroes the branch's last weight layer, or
    its ReZero scale), and torchvision-style blocks with a `bn3` / `bn2` BatchNorm (zeroes
    that norm's weight, as torchvision's `zero_init_residual=True`).

    Returns:
      One line per branch. Raises `NoLayersError` if the model has no residual branch.
    """
    done = []
    for name, m in model.named_modules():
        if isinstance(m, Residual):
            done.append(f"{name}: {m.zero_()}")
        elif isinstance(getattr(m, "bn3", None), nn.modules.batchnorm._BatchNorm):
            nn.init.zeros_(m.bn3.weight)
            done.append(f"{name}.bn3: weight zeroed")
        elif isinstance(getattr(m, "bn2", None), nn.modules.batchnorm._BatchNorm) and hasattr(m, "conv2"):
            nn.init.zeros_(m.bn2.weight)
            done.append(f"{name}.bn2: weight zeroed")
    if not done:
        raise NoLayersError(f"{type(model).__name__} has no residual branch (graddoctor.treat.surgery.Residual, or a "
                            "block with bn2/bn3); add some with graddoctor.treat.surgery.add_residual first")
    return done


# The last layer of a residual branch in the transformer code people use: GPT-2/nanoGPT `c_proj`,
# `nn.MultiheadAttention.out_proj` and `nn.TransformerEncoderLayer.linear2`, Llama `o_proj`/`down_proj`,
# BERT/ViT `fc2`. Each adds into the residual stream, so their variances add up over the depth.
RESIDUAL_PROJECTIONS = ("c_proj", "out_proj", "linear2", "o_proj", "down_proj", "fc2")


def gpt2_(model: nn.Module, std: float = 0.02) -> list[str]:
    """GPT-2's transformer init (Radford et al. 2019): every Linear, HF Conv1D and Embedding weight (and
    `nn.MultiheadAttention`'s packed q/k/v projection) from N(0, std), biases zero, LayerNorms at gain 1
    and bias 0, and the residual projections (names ending in `RESIDUAL_PROJECTIONS`) from
    N(0, std / sqrt(n)) for the n of them, so the residual stream's variance stays near its input's
    however deep the model is.

    Tied weights (a head sharing the embedding's tensor) are set once. Returns one line per module set.
    """
    if not (isinstance(std, (int, float)) and not isinstance(std, bool) and 0 < std < 1):
        from .._errors import ConfigError
        raise ConfigError(f"std={std!r} is not allowed: use a number in (0, 1) (GPT-2 uses 0.02)")
    weights = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "Conv1D"]
    if not weights:
        raise NoLayersError(f"{type(model).__name__} has no Linear, Conv1D or Embedding layer to initialise")
    residual = [n for n, _ in weights if n.rpartition(".")[2] in RESIDUAL_PROJECTIONS]
    small = std / math.sqrt(len(residual)) if residual else std
    done, seen = [], set()
    with torch.no_grad():
        for name, m in weights:
            s = small if name in residual else std
            if id(m.weight) not in seen:
                seen.add(id(m.weight))
                nn.init.normal_(m.weight, 0.0, s)
                done.append(f"{name}: N(0, {s:.4g})")
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        for name, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:  # q, k, v packed in one
                nn.init.normal_(m.in_proj_weight, 0.0, std)
                done.append(f"{name}.in_proj_weight: N(0, {std:.4g})")
                if m.in_proj_bias is not None:
                    nn.init.zeros_(m.in_proj_bias)
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return done
