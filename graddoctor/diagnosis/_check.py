"""check: predict vanishing or exploding gradients from one batch, before training.

    report = gd.check(model, x, y)          # one forward and one backward; the model is left as it was
    print(gd.format_check(report))

Signal propagation (He et al. 2015, section 2.2): with weights of variance v / fan_in, each ReLU layer
multiplies the second moment of the signal by v / 2 (a sigmoid by far less), so across L layers the
forward signal and, symmetrically, the backward gradient scale like (v / 2)^(L / 2). One batch is
enough to measure both profiles:
- forward: the RMS of each weighted layer's output (Linear, Conv, RNN), input side first;
- backward: each weighted layer's gradient norm relative to its weight norm.
The prediction compares first and last layers and the per-layer gain of the signal, and names the
likely cause from the activations found (saturated, dead) and the weight scale against fan-in.
Normalized networks (a pre-LN transformer) hide a bad weight scale from both profiles, so the scale is
judged on its own too: weights far too large for their fan-in (median std * sqrt(fan_in) above
`weight_gain_high`), or, for class targets, a loss far above ln(classes), the loss of a uniform
prediction (ln(vocab) for a language model), make the verdict "poor_initialization".

Host syncs: many; this runs once, before training, not in the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, cast

import torch
from torch import Tensor, nn

from .._errors import NoGradientsError
from ..core._activations import activation_row
from ..core._layers import activation_kind

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase)


@dataclass(frozen=True)
class LayerProfile:
    """One weighted layer at the checked batch (input side first)."""

    name: str
    output_rms: float   # RMS of the layer's output (forward signal)
    grad_norm: float    # L2 norm of the layer's weight gradient
    weight_norm: float  # L2 norm of the layer's weight
    weight_gain: float  # weight std * sqrt(fan_in): 1 is Xavier/LeCun, sqrt(2) is He

    @property
    def grad_to_weight(self) -> float:
        return self.grad_norm / self.weight_norm if self.weight_norm > 0 else math.nan


@dataclass(frozen=True)
class CheckReport:
    """What `check` measured and predicts.

    verdict: "vanishing", "exploding", "nonfinite", "poor_initialization" or "healthy".
    gradient_ratio: first layer's grad/weight ratio over the last layer's.
    signal_gain: geometric mean, per layer, of the change in output RMS from first to last layer.
    """

    verdict: str
    reasons: list[str]
    layers: list[LayerProfile]
    gradient_ratio: float
    signal_gain: float
    saturated: dict[str, float] = field(default_factory=dict)
    dead: dict[str, float] = field(default_factory=dict)
    loss_over_uniform: float = math.nan  # the loss over ln(classes) for class targets (1: a uniform prediction)


@dataclass(frozen=True)
class CheckThresholds:
    """When a profile counts as vanishing or exploding (orders of magnitude across the net)."""

    gradient_ratio_low: float = 1e-2   # first/last grad-to-weight below this: vanishing
    gradient_ratio_high: float = 1e2   # above this: exploding
    signal_ratio_low: float = 1e-2     # last/first output RMS below this: the signal dies out
    signal_ratio_high: float = 1e2     # above this: the signal blows up
    mostly: float = 0.5                # a layer with more than this fraction saturated/dead is named
    weight_gain_high: float = 3.0      # median std * sqrt(fan_in) above this: weights too large (He is 1.41)
    loss_over_uniform_high: float = 2.0  # class targets: a loss this many times ln(classes): confidently wrong


def _default_loss(out: Tensor, target: Optional[Tensor]) -> Tensor:
    if target is None:  # no target: a scalar whose gradient is the output itself
        return 0.5 * out.float().pow(2).mean()
    if not target.is_floating_point():
        return nn.functional.cross_entropy(out, target)
    return nn.functional.mse_loss(out, target)


def _weight(module: nn.Module) -> Optional[Tensor]:
    if isinstance(module, nn.RNNBase):
        return getattr(module, "weight_hh_l0", None)
    w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) and w.requires_grad else None


def check(model: nn.Module, inputs: Tensor, targets: Optional[Tensor] = None,
          loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
          thresholds: Optional[CheckThresholds] = None) -> CheckReport:
    """Run one forward and backward pass on a batch and predict the gradient health of training.

    The model's existing `.grad` tensors are put back afterwards; nothing else changes.

    Args:
      model: the network, as it will start training.
      inputs: one batch.
      targets: the batch's targets (class indices: cross-entropy; floats: MSE); None uses 0.5*mean(out^2).
      loss_fn: `loss_fn(output, targets)`, overriding the default.
      thresholds: a `CheckThresholds`.
    Returns:
      A `CheckReport`.
    References:
      He et al. 2015, "Delving Deep into Rectifiers", section 2.2; Glorot & Bengio 2010.
    """
    th = thresholds or CheckThresholds()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _WEIGHTED) and _weight(m) is not None]
    if not layers:
        raise NoGradientsError(f"{type(model).__name__} has no trainable Linear, Conv or RNN layer to check")
    acts = [(n, m, k) for n, m in model.named_modules() if (k := activation_kind(m)) is not None]
    rms: dict[str, float] = {}
    act_rows: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(_rms_hook(rms, n)) for n, m in layers]
    handles += [m.register_forward_hook(_act_hook(act_rows, n, k)) for n, m, k in acts]
    saved = {p: p.grad for p in model.parameters()}
    try:
        for p in saved:
            p.grad = None
        out = model(inputs)
        out = out[0] if isinstance(out, tuple) else out
        if loss_fn is None:
            loss = _default_loss(out, targets)
        else:  # a custom loss gets the targets as given (None when none were)
            loss = loss_fn(out, cast(Tensor, targets))
        loss.backward()
        profile = [_profile(n, m, rms.get(n, math.nan)) for n, m in layers]
    finally:
        for h in handles:
            h.remove()
        for p, g in saved.items():
            p.grad = g
    saturated = {n: float(r[2]) for n, r in act_rows.items() if not math.isnan(float(r[2]))}
    relu = {n for n, _, k in acts if k.relu_family}
    dead = {n: float(r[4]) for n, r in act_rows.items() if n in relu}
    return _verdict(profile, saturated, dead, th, float(loss.detach()), _uniform_loss(out, targets))


def _uniform_loss(out: Tensor, targets: Optional[Tensor]) -> float:
    """ln(classes) when the targets are class indices over the output's last dimension (a classifier, or a
    language model's (batch, time) targets against (batch, time, vocab) logits), else NaN."""
    if targets is None or targets.is_floating_point() or out.ndim < 2:
        return math.nan
    classes = out.shape[-1]
    if classes < 2 or targets.numel() * classes != out.numel():
        return math.nan
    return math.log(classes)


def _rms_hook(rms: dict, name: str):
    def hook(_m, _inp, out):
        out = out[0] if isinstance(out, tuple) else out
        rms.setdefault(name, float(out.detach().float().pow(2).mean().sqrt()))
    return hook


def _act_hook(rows: dict, name: str, kind):
    def hook(_m, _inp, out):
        out = out[0] if isinstance(out, tuple) else out
        rows.setdefault(name, activation_row(out, kind, 0.01))
    return hook


def _profile(name: str, module: nn.Module, out_rms: float) -> LayerProfile:
    w = _weight(module)
    assert w is not None, "check() profiles only layers with a weight"
    fan_in = w[0].numel() if w.ndim > 1 else 1
    g = w.grad
    return LayerProfile(name=name, output_rms=out_rms,
                        grad_norm=float(torch.linalg.vector_norm(g.float())) if g is not None else math.nan,
                        weight_norm=float(torch.linalg.vector_norm(w.detach().float())),
                        weight_gain=float(w.detach().float().std() * math.sqrt(fan_in)) if w.numel() > 1 else math.nan)


def _verdict(layers: list[LayerProfile], saturated: dict, dead: dict, th: CheckThresholds, loss: float,
             uniform: float = math.nan) -> CheckReport:
    first, last = layers[0], layers[-1]
    ratio = first.grad_to_weight / last.grad_to_weight if last.grad_to_weight else math.nan
    depth = max(len(layers) - 1, 1)
    signal = last.output_rms / first.output_rms if first.output_rms else math.nan
    gain = signal ** (1.0 / depth) if signal > 0 else (0.0 if signal == 0 else math.nan)
    reasons = _causes(layers, saturated, dead, th)
    values = [ratio, signal, loss] + [layer.grad_norm for layer in layers]
    if any(not math.isfinite(v) for v in values if not math.isnan(v)) or math.isnan(loss):
        verdict = "nonfinite"
    elif ratio < th.gradient_ratio_low or signal < th.signal_ratio_low:
        verdict = "vanishing"
    elif ratio > th.gradient_ratio_high or signal > th.signal_ratio_high:
        verdict = "exploding"
    else:
        verdict = "poor_initialization" if _poor_scale(layers, loss, uniform, th, reasons) else "healthy"
    reasons.insert(0, f"first/last layer gradient-to-weight ratio {ratio:.3g}; last/first output RMS {signal:.3g} "
                      f"over {depth} layers (x{gain:.3g} per layer)")
    return CheckReport(verdict, reasons, layers, ratio, gain, saturated, dead, loss / uniform)


def _poor_scale(layers: list[LayerProfile], loss: float, uniform: float, th: CheckThresholds,
                reasons: list[str]) -> bool:
    """Whether the weight scale is wrong although the profiles look fine (normalization hides it); adds why."""
    gains = sorted(g for g in (layer.weight_gain for layer in layers) if math.isfinite(g))
    median = gains[len(gains) // 2] if gains else math.nan
    poor = False
    if median > th.weight_gain_high:
        reasons.append(f"median weight std x sqrt(fan_in) is {median:.3g} (above {th.weight_gain_high}): the "
                       "weights are far too large for their fan-in")
        poor = True
    if math.isfinite(uniform) and loss > th.loss_over_uniform_high * uniform:
        reasons.append(f"the loss {loss:.3g} is {loss / uniform:.2g}x ln(classes) = {uniform:.3g}, the loss of a "
                       "uniform prediction: the initial logits are large and confidently wrong")
        poor = True
    return poor


def _causes(layers: list[LayerProfile], saturated: dict, dead: dict, th: CheckThresholds) -> list[str]:
    out = []
    sat = [n for n, f in saturated.items() if f > th.mostly]
    if sat:
        out.append(f"{len(sat)} bounded activation(s) mostly saturated ({', '.join(sat[:3])}): derivatives near 0")
    dd = [n for n, f in dead.items() if f > th.mostly]
    if dd:
        out.append(f"{len(dd)} ReLU-family activation(s) with most units dead ({', '.join(dd[:3])})")
    gains = [layer.weight_gain for layer in layers if math.isfinite(layer.weight_gain)]
    if gains:
        mean_gain = sum(gains) / len(gains)
        if mean_gain > 2.0:
            out.append(f"weights are large for their fan-in (std x sqrt(fan_in) = {mean_gain:.2g}; "
                       "He is 1.41, Xavier 1)")
        elif mean_gain < 0.5:
            out.append(f"weights are small for their fan-in (std x sqrt(fan_in) = {mean_gain:.2g}; "
                       "He is 1.41, Xavier 1)")
    return out


def format_check(report: CheckReport) -> str:
    """The report as text: verdict, reasons, and the per-layer profile."""
    lines = [f"check: {report.verdict}"] + [f"  - {r}" for r in report.reasons]
    lines.append(f"  {'layer':<16} {'out RMS':>10} {'grad/weight':>12} {'w-gain':>7}")
    for p in report.layers:
        lines.append(f"  {p.name or '(root)':<16} {p.output_rms:>10.3g} {p.grad_to_weight:>12.3g} "
                     f"{p.weight_gain:>7.3g}")
    return "\n".join(lines)
