"""Evidence the rules share and the causes are chosen from: the start-of-training profile,
input outliers, large updates. Each helper returns numbers plus plain-words reasons.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..core._layers import BOUNDED_KINDS, EXACT_ZERO_KINDS
from ._config import DiagnoseConfig
from ._data import ACT_DEAD, ACT_NONFINITE, ACT_SAT, ACT_STD, RunData
from ._remedies import model_facts  # the facts the catalogue's applicability tests read
from ._robust import finite_median, robust_z, running_median_mad, safe_log10


def _r(x: float, digits: int = 3) -> float:
    """A float rounded to `digits` significant digits for evidence (NaN/Inf kept)."""
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.{digits}g}")


# Activation kinds of recurrent layers' outputs (graddoctor.core._layers).
RECURRENT_KINDS = ("rnn", "lstm", "gru", "rnn_relu")


# Optimizers whose step does not depend on the gradients' scale (they divide by a running RMS of them):
# each step moves each weight by about the learning rate, whatever the gradient's size.
SCALE_INVARIANT = frozenset({"Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "RMSprop", "Adafactor",
                             "SparseAdam", "Adadelta"})


def scale_invariant_optimizer(d: RunData) -> bool:
    """Whether the run's optimizer (recorded by class name) is one of `SCALE_INVARIANT`."""
    return d.meta.get("optimizer") in SCALE_INVARIANT


def feedforward_acts(d: RunData) -> list[int]:
    """Activation modules outside recurrent layers, in forward order."""
    rec = d.recurrent_modules
    return [j for j, m in enumerate(d.act_modules)
            if d.act_kinds[j] not in RECURRENT_KINDS
            and not any(m == r or m.startswith(r + ".") for r in rec)]


def activation_family(d: RunData) -> str:
    """'relu' (ReLU family), 'bounded' (sigmoid/tanh-like), 'mixed' or 'none' among feed-forward activations."""
    kinds = {d.act_kinds[j] for j in feedforward_acts(d)}
    if not kinds:
        return "none"
    bounded = {k for k in kinds if k in BOUNDED_KINDS and k != "relu6"}
    if bounded and bounded == kinds:
        return "bounded"
    return "mixed" if bounded else "relu"


def fitting_init(d: RunData) -> str:
    """The init that fits the model: GPT-2's N(0, 0.02) for a transformer (embeddings feeding attention), else by
    the activations found: He for ReLU-family, Xavier for tanh/sigmoid, orthogonal for linear."""
    if model_facts(d).transformer_style:
        return "gpt2_init"
    inits = {"relu": "he_init", "bounded": "xavier_init", "mixed": "lsuv_init", "none": "orthogonal_init"}
    return inits[activation_family(d)]


def activation_class(d: RunData) -> str:
    """The most common feed-forward activation module class, as code for snippets (default nn.ReLU)."""
    names = [d.modules.get(d.act_modules[j], "") for j in feedforward_acts(d)]
    names = [n for n in names if n]
    return f"nn.{max(set(names), key=names.count)}" if names else "nn.ReLU"


def weight_scales(d: RunData) -> dict[str, float]:
    """Initial weight RMS * sqrt(fan_in) per eligible non-recurrent matrix.

    1 is LeCun, 1.41 is He, 0.58 is the torch default.
    """
    out = {}
    for i in d.eligible:
        if d.is_recurrent_tensor(int(i)):
            continue
        shape = d.tensor_shape[int(i)]
        fan_in = int(np.prod(shape[1:]))
        out[d.tensors[int(i)]] = _r(d.initial_weight_rms[int(i)] * math.sqrt(fan_in))
    return out


@dataclass
class InitProfile:
    """What the first steps say about the initialization."""

    step: int = 0
    poor: bool = False
    std_orders: float = float("nan")       # log10(std of last activation / std of first) at the first sample
    saturated: float = float("nan")        # mean fraction saturated over bounded activations
    dead: float = float("nan")             # mean fraction of dead units over exact-zero ReLU-family activations
    gain_orders: float = float("nan")      # log10 of the product of weight scales (no activation statistics only)
    reasons: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)

    def evidence(self) -> dict:
        return {"init_sample_step": self.step, "activation_std_change_orders": _r(self.std_orders),
                "init_saturated_fraction": _r(self.saturated), "init_dead_unit_fraction": _r(self.dead),
                "predicted_gain_orders": _r(self.gain_orders)}


def _mean_fraction(d: RunData, acts: list[int], sample: int, kinds, field: int) -> tuple[float, list[int]]:
    """The mean of activation statistic `field` at `sample` over the modules in `acts` of one of `kinds`
    with a finite value, and those modules (NaN and none when there are none)."""
    cols = [j for j in acts if d.act_kinds[j] in kinds and np.isfinite(d.act[sample, j, field])]
    return (float(np.mean(d.act[sample, cols, field])) if cols else float("nan")), cols


def init_profile(d: RunData, cfg: DiagnoseConfig) -> InitProfile:
    """Judge the initialization from the first activation sample, or from weight scales when there is none."""
    prof = InitProfile()
    acts = feedforward_acts(d)
    first = _first_finite_sample(d, acts)
    if first is not None and d.act_steps[first] <= cfg.init_max_step:
        prof.step = int(d.act_steps[first])
        row = d.act[first]
        std = row[acts, ACT_STD].astype(np.float64)
        ok = np.flatnonzero(np.isfinite(std) & (std > 0))
        if len(ok) >= 2:
            prof.std_orders = float(safe_log10(std[ok[-1]]) - safe_log10(std[ok[0]]))
            if abs(prof.std_orders) >= cfg.init_std_orders:
                way = "shrinks" if prof.std_orders < 0 else "grows"
                prof.reasons.append(f"activation std {way} {10 ** abs(prof.std_orders):.3g}x from "
                                    f"{d.act_modules[acts[ok[0]]]} to {d.act_modules[acts[ok[-1]]]} "
                                    f"at step {prof.step}")
                prof.layers = [d.act_modules[acts[ok[0]]], d.act_modules[acts[ok[-1]]]]
        prof.saturated, bounded = _mean_fraction(d, acts, first, BOUNDED_KINDS, ACT_SAT)
        if prof.saturated > cfg.saturated_fraction:  # NaN (no bounded activation) is never above
            prof.reasons.append(f"{prof.saturated:.0%} of bounded activations saturated at step {prof.step}")
            prof.layers = prof.layers or [d.act_modules[j] for j in bounded]
        prof.dead, zeroing = _mean_fraction(d, acts, first, EXACT_ZERO_KINDS, ACT_DEAD)
        if prof.dead > cfg.dead_fraction:
            prof.reasons.append(f"{prof.dead:.0%} of ReLU units dead over the whole batch at step {prof.step}")
            prof.layers = prof.layers or [d.act_modules[j] for j in zeroing]
    elif not acts:
        _weight_profile(d, cfg, prof)
    prof.poor = bool(prof.reasons)
    return prof


def _weight_profile(d: RunData, cfg: DiagnoseConfig, prof: InitProfile) -> None:
    """No activation statistics: weights far from any standard scale AND a gradient depth profile
    that is already orders of magnitude off in the first steps. (Weight scales alone mislead in
    residual nets, where the skip path, not the product of layers, carries the signal.)"""
    scales = weight_scales(d)
    lr = d.log_grad_ratio
    if len(scales) < cfg.min_depth or lr.shape[1] < cfg.min_depth:
        return
    s = np.array(list(scales.values()), dtype=np.float64)
    prof.gain_orders = float(np.sum(safe_log10(s)))
    k = max(1, lr.shape[1] // 4)
    early = slice(0, max(1, min(10, len(lr))))
    drop = finite_median(lr[early, :k]) - finite_median(lr[early, -k:])
    med = float(np.median(s))
    off_scale = med < 0.25 or med > 4.0
    if off_scale and np.isfinite(drop) and abs(drop) >= cfg.init_gain_orders:
        way = "shrink" if med < 1 else "grow"
        prof.reasons.append(f"weights are {med:.3g}x the LeCun scale (RMS*sqrt(fan_in); He: 1.41) and {way} "
                            f"signals by 10^{prof.gain_orders:.1f} over {len(s)} layers; input-side gradients are "
                            f"10^{drop:.1f} of the output side's in the first steps")
        prof.layers = list(scales)


def _first_finite_sample(d: RunData, acts: list[int]):
    if not acts or len(d.act_steps) == 0 or d.act.ndim != 3 or d.act.shape[1] != len(d.act_modules):
        return None
    finite = np.isfinite(d.act[:, acts, ACT_STD]).any(axis=1)
    idx = np.flatnonzero(finite)
    return int(idx[0]) if len(idx) else None


def input_flags(d: RunData, cfg: DiagnoseConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(outlier mask, non-finite mask, orders above the running median) over the input samples.

    A batch is an outlier when its max-abs or its std is `input_orders` above the running median
    of the previous batches' and `input_z` robust z-scores above it. The std catches scaled
    batches in data whose max-abs is heavy-tailed from batch to batch (rare, large features).
    """
    x = d.inputs
    n = len(d.input_steps)
    if n == 0 or x.ndim != 2 or x.shape[1] < 4:
        z = np.zeros(n, dtype=bool)
        return z, z, np.zeros(n)
    nonfinite = (np.nan_to_num(x[:, 1], nan=1.0) > 0) | ~np.isfinite(x[:, 0])
    outlier = np.zeros(n, dtype=bool)
    above_max = np.zeros(n)
    for col in (0, 3):  # max-abs, std
        lg = safe_log10(np.where(nonfinite, np.nan, x[:, col]))
        med, mad = running_median_mad(lg, cfg.baseline_window, cfg.baseline_min)
        above = lg - med
        z = robust_z(lg, med, mad, floor=0.02)
        with np.errstate(invalid="ignore"):
            outlier |= np.nan_to_num((above >= cfg.input_orders) & (z >= cfg.input_z), nan=0).astype(bool)
        above_max = np.fmax(above_max, np.where(np.isfinite(above), above, np.nan))
    return outlier, nonfinite, np.nan_to_num(above_max, nan=0.0)


def bad_input_steps(d: RunData, cfg: DiagnoseConfig) -> np.ndarray:
    """Steps whose input batch was an outlier or held NaN/Inf."""
    outlier, nonfinite, _ = input_flags(d, cfg)
    return d.input_steps[outlier | nonfinite]


def recurrent_state_nonfinite(d: RunData) -> Optional[tuple[str, int]]:
    """(recurrent module, step) when the first activation sample holding NaN/Inf finds it first (in forward
    order) in a recurrent layer's output: the carried state went non-finite there, not the data before it."""
    if len(d.act_steps) == 0 or d.act.ndim != 3 or d.act.shape[1] != len(d.act_modules):
        return None
    bad = np.nan_to_num(d.act[:, :, ACT_NONFINITE], nan=0.0) > 0
    rows = np.flatnonzero(bad.any(axis=1))
    if not len(rows):
        return None
    j = int(np.argmax(bad[rows[0]]))
    recurrent = d.act_kinds[j] in RECURRENT_KINDS or any(
        d.act_modules[j] == r or d.act_modules[j].startswith(r + ".") for r in d.recurrent_modules)
    return (d.act_modules[j], int(d.act_steps[rows[0]])) if recurrent else None


def large_update_mask(d: RunData, cfg: DiagnoseConfig) -> np.ndarray:
    """Update samples whose median update/weight ratio over layers exceeds the threshold (non-finite is large)."""
    ur = d.log_update_ratio
    if ur.shape[1] == 0:
        return np.zeros(len(d.update_steps), dtype=bool)
    thr = math.log10(cfg.large_update_ratio)
    # Non-finite updates are the non-finite rule's business; only finite ratios count here. The median is
    # over the tensors measured at that sample (a bounded snapshot measures a subset; the others sort last).
    measured = d.update_measured[:, d.eligible]
    srt = np.sort(np.where(measured, np.where(np.isfinite(ur), ur, -np.inf), np.inf), axis=1)
    m = measured.sum(axis=1)
    med = srt[np.arange(len(srt)), np.maximum(m - 1, 0) // 2]
    return (m > 0) & (med >= thr)
