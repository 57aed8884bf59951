"""DiagnoseConfig: every threshold the rules use, with its default and where it comes from."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any, NamedTuple, Optional

from .._errors import ConfigError
from ..core._config import config_from_options


@dataclass(frozen=True)
class DiagnoseConfig:
    """Thresholds of the diagnosis rules. Ratios are plain numbers; "orders" are powers of ten.

    References:
      [Glorot10] Glorot & Bengio, "Understanding the difficulty of training deep feedforward networks", 2010.
      [He15] He et al., "Delving Deep into Rectifiers", 2015.
      [Pascanu13] Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks", 2013.
      [Karpathy] CS231n notes, "Neural Networks Part 3": update/weight ratio about 1e-3 is healthy.
      [Hampel74] Hampel, "The influence curve and its role in robust estimation", 1974 (median/MAD).
      [Mann45] Mann, "Nonparametric tests against trend", 1945 (rank trend test).
      [Lu19] Lu et al., "Dying ReLU and Initialization", 2019.
      [Kumar24] Kumar et al., "ZClip: adaptive spike mitigation", 2025 (z-score of gradient norms).
      [Wortsman23] Wortsman et al., "Small-scale proxies for large-scale Transformer training instabilities", 2023.
      [Dehghani23] Dehghani et al., "Scaling Vision Transformers to 22 Billion Parameters", 2023.
      [PaLM22] Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022 (z-loss 1e-4).
    """

    # --- vanishing_gradient ---------------------------------------------------------------
    # Depth profile: input-side layers' grad/weight ratio this many orders below the
    # output-side layers' [Glorot10 fig. 7 shows ~1-2 orders for sigmoid nets at depth 5].
    vanish_depth_orders: float = 2.0
    # Everything stalls: median grad/weight ratio over layers below this [Karpathy: 1e-3 is healthy
    # for updates; a gradient 10x smaller than that relative to the weight moves nothing].
    stall_grad_ratio: float = 1e-4
    # Everything stalls (optimizers that follow the gradient's size, e.g. SGD): median update/weight ratio.
    stall_update_ratio: float = 1e-5
    # A form counts when it holds on at least this fraction of the steps that can be judged.
    min_fraction: float = 0.5
    # Stalled steps count only while the loss is above this fraction of its starting level
    # (a converged run has tiny gradients for a good reason).
    stall_loss_level: float = 0.5
    # Fewest weight matrices for a depth profile (input side, output side and something between).
    min_depth: int = 3
    # Through time (recurrent layers): the last step's gradient reaches the first step this many orders
    # smaller. 7 orders is float32's resolution (eps 1.2e-7): a weight's gradient sums every step's
    # share, and a share 1e-7 of the others' is rounded away, so the first steps are not learned at all.
    # Counted, like a stall, only while the loss is above stall_loss_level of its start [Pascanu13 sec. 2].
    vanish_time_orders: float = 7.0

    # --- exploding_gradient --------------------------------------------------------------
    # A norm this many orders above its own running median counts as a rise [Pascanu13 sec. 3].
    explode_rise_orders: float = 1.5
    # ... and this many robust z-scores (median/MAD of log norms) above it [Hampel74, Kumar24].
    explode_z: float = 6.0
    # Per-layer grad/weight ratio far above 1: a unit-learning-rate step would replace the weight 10 times over.
    explode_grad_ratio: float = 10.0
    # Input-side grad/weight ratios this many orders above the output side: growth toward the input.
    explode_depth_orders: float = 2.0
    # A per-layer rise counts only while that layer's grad/weight ratio is at least this: a layer
    # growing from a tiny start (the branch behind a ReZero scale or a zero-initialised end
    # waking up) is not exploding.
    explode_layer_ratio: float = 0.1
    # ... and this many orders above where it started (the median of the first `baseline_window`
    # steps): a norm climbing back from a plateau to its starting level is learning resuming
    # (e.g. an LSTM finding the solution), not an explosion.
    explode_over_start_orders: float = 1.0
    # A rise must last this many steps, unless non-finite values follow it.
    explode_min_steps: int = 2
    # Trailing steps in every running baseline (loss, norms, inputs).
    baseline_window: int = 50
    # Fewest earlier finite values before a baseline is trusted.
    baseline_min: int = 8

    # --- mixed precision (runs watched with a GradScaler) -----------------------------------
    # Steps the GradScaler skipped for an overflow of its loss scale are expected while it calibrates
    # (the overflows from the first step on, halving the scale until it fits), and then about one per
    # `growth_interval` (2000) steps [PyTorch AMP docs]. More than this fraction of the steps after
    # calibration skipped means the scale never settles: a warning.
    amp_overflow_fraction: float = 0.05
    # ... as does a scale that fell below this: the gradients overflow even at (almost) no scaling.
    amp_min_scale: float = 1.0
    # Over this fraction skipped after calibration (or every step skipped down to a scale below
    # `amp_min_scale`), training has all but stopped: critical.
    amp_stalled_fraction: float = 0.5
    # A GradScaler that was not passed to watch: the recorded gradients carry the loss scale (2^16 by
    # default). The first finite steps' median grad/weight ratio above this is that large ...
    amp_grad_ratio: float = 30.0
    # ... and the scale implied by a plain SGD step (lr * |g| / |update|) within this relative distance of
    # a power of two of at least 2^`amp_min_log2` is the scale itself (GradScaler scales by powers of two).
    amp_pow2_tol: float = 0.01
    amp_min_log2: int = 8

    # --- loss ----------------------------------------------------------------------------
    # Loss spike: this many robust z-scores above the running median [Hampel74] ...
    spike_z: float = 10.0
    # ... and at least this factor above it, so a tiny loss's tiny wiggles do not count.
    spike_factor: float = 2.0
    # ... and the jump must be at least this fraction of the starting loss level: near convergence
    # minibatch losses are heavy-tailed (0.001 -> 0.05 is noise, not a setback).
    spike_min_jump: float = 0.25
    # Fewest earlier finite losses before spikes are judged: a MAD from a handful of
    # heavy-tailed minibatch losses is too small to trust.
    spike_min_history: int = 25
    # Loss not decreasing: one-sided significance of the rank trend test [Mann45].
    trend_p: float = 0.01
    # Fewest finite losses before the trend test speaks.
    trend_min_steps: int = 30
    # Most points the trend test ranks (longer histories are reduced to block medians).
    trend_max_points: int = 2000
    # A loss that already fell this many times below where the run started (the median of its first 10
    # losses; for a language model at least ln(vocab)) is converged, not stuck: its flat tail is the floor
    # it reached (an LSTM LM falling from ln(vocab) = 2.77 to 0.6). A stalled run does not halve its loss.
    converged_fall: float = 2.0
    # Early explosion: before a running baseline exists (the first `spike_min_history` losses), a loss
    # this many times above the start level (the step-0 loss; for a language model at least ln(vocab),
    # the loss of a uniform prediction) is a spike (a loss 4.3 -> 51 -> 143 in two steps).
    early_spike_factor: float = 5.0
    # For a language model: an early loss this many times its uniform-prediction loss ln(vocab) (or the
    # step-0 loss if higher) is an explosion too: the model is then far more confidently wrong than a
    # uniform guess, which no healthy run gets near after its first step.
    early_lm_spike_factor: float = 2.0

    # --- activations and initialization -------------------------------------------------
    # A bounded activation with more than this fraction of its outputs near a bound is saturated.
    saturated_fraction: float = 0.5
    # A ReLU-family layer with more than this fraction of units zero over a whole batch is dead [Lu19].
    dead_fraction: float = 0.5
    # Activation std changing by more than this many orders from the first to the last layer at
    # the start of training means the init does not preserve variance [Glorot10, He15].
    init_std_orders: float = 1.0
    # Without activation statistics: product over layers of (weight RMS * sqrt(fan_in)) outside
    # 10^(+-this) predicts vanishing/exploding signals [Glorot10 eq. 10].
    init_gain_orders: float = 2.0
    # First activation sample must be at or before this step to describe the initialization.
    init_max_step: int = 50
    # Weight scale against fan-in at the first sample: the median over weight matrices of
    # RMS * sqrt(fan_in) above this is too large (Xavier/LeCun 1, He 1.41, PyTorch's Linear default
    # 0.58, GPT-2's N(0, 0.02) below 0.2; N(0, 1) at width 32 is 5.7) [Glorot10, He15].
    init_gain_high: float = 3.0
    # An embedding table with RMS above this is too large (PyTorch's nn.Embedding default N(0, 1) is 1,
    # GPT-2's 0.02): it swamps the residual stream.
    init_embed_rms_high: float = 10.0
    # A language model's step-0 loss above this many times ln(vocab) (the loss of a uniform prediction):
    # its initial logits are large and confidently wrong.
    init_loss_factor: float = 2.0

    # --- inputs and updates -------------------------------------------------------------
    # An input batch whose max-abs is this many orders above the running median ...
    input_orders: float = 1.0
    # ... and this many robust z-scores above it is an outlier.
    input_z: float = 6.0
    # Median update/weight ratio over layers above this at a sampled step is a large update
    # [Karpathy: ~1e-3 is healthy; 0.25 means a quarter of the weight's size in one step].
    large_update_ratio: float = 0.25

    # --- transformer stability signals (sampled every activation_every steps) -------------
    # Attention logit growth [Wortsman23, Dehghani23]: a max attention logit |q.k|/sqrt(d_head) at or above
    # this saturates the softmax: a logit gap of ln(2^24) = 16.6 already rounds the other weights away
    # against 1 in float32, and a max |logit| of 50 allows gaps up to 100. Healthy small runs stay in the
    # tens at most; the papers' unstable runs reach 10^3-10^4 ...
    attn_logit_level: float = 50.0
    # ... having grown at least this many times over its first sample (a model that starts saturated is
    # an initialization problem, not growth).
    attn_logit_growth: float = 10.0
    # Output logit divergence [PaLM22, Wortsman23]: the mean log Z of the LM head's logits at or beyond
    # +-this, after it started within half of it (log Z starts near ln(vocab), 10.8 for GPT-2's vocabulary).
    # Logits that far from 0 lose precision: bfloat16 keeps 8 bits, so a logit of 50 carries an error of
    # about 0.1 (10% in probability); z-loss holds log Z near 0.
    logz_level: float = 50.0
    # A layer's update/weight ratio at a sample this many times above its median over the earlier samples
    # is an update spike; one shortly before a loss spike is named in the loss_spike's evidence.
    update_spike_factor: float = 5.0

    # --- what counts as a weight ---------------------------------------------------------
    # Tensors with initial RMS below this are zero-initialised on purpose (residual branch ends,
    # ReZero scales) and are left out of ratio rules.
    zero_init_rms: float = 1e-6

    def validate(self) -> None:
        """Raise `ConfigError` naming the field, its bad value and the allowed range (see `RANGES`)."""
        for f in fields(self):
            problem = RANGES[f.name].check(getattr(self, f.name))
            if problem:
                raise ConfigError(f"DiagnoseConfig.{f.name}={getattr(self, f.name)!r} is not allowed: use {problem}")
        if self.baseline_min > self.baseline_window:
            raise ConfigError(f"DiagnoseConfig.baseline_min={self.baseline_min!r} is not allowed: use an integer "
                              f"from 1 to baseline_window ({self.baseline_window})")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "DiagnoseConfig":
        cfg = config_from_options(cls, options, "diagnose")
        cfg.validate()
        return cfg


class Range(NamedTuple):
    """The values a DiagnoseConfig field allows: an integer or a finite real number between lo and hi
    (None: no bound), each end open (excluded) or closed."""

    kind: str                  # "int" or "real"
    lo: Optional[float]
    hi: Optional[float]
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        """What is allowed, as the error message says it: "a number in (0, 1]", "an integer from 2 to 10000"."""
        lo, hi = _num(self.lo), _num(self.hi)
        if self.kind == "int":
            return f"an integer from {lo} to {hi}" if self.hi is not None else f"an integer >= {lo}"
        if self.hi is None:
            return f"a finite number {'>' if self.lo_open else '>='} {lo}"
        return f"a number in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def check(self, value: Any) -> str:
        """"" if `value` is allowed, else `describe()`."""
        if isinstance(value, bool) or not isinstance(value, Integral if self.kind == "int" else Real):
            return self.describe()
        try:
            v = float(value)
        except OverflowError:  # an int too large for a float: beyond any bound
            return self.describe()
        if not math.isfinite(v):
            return self.describe()
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return self.describe()
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return self.describe()
        return ""


def _num(x: Optional[float]) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() else f"{x:g}")


_POSITIVE = Range("real", 0, None, lo_open=True)          # a threshold on a ratio or a z-score
_FRACTION = Range("real", 0, 1, lo_open=True)             # (0, 1]
_ORDERS = Range("real", 0, 100, lo_open=True)             # powers of ten; log norms are floored at 1e-30
_STEPS = Range("int", 1, 10 ** 9)                         # a count of steps

# The allowed values of every DiagnoseConfig field, checked by `DiagnoseConfig.validate` (and documented
# in the README). Windows are bounded because the running baselines hold steps x window numbers.
RANGES: dict[str, Range] = {
    "vanish_depth_orders": _ORDERS,
    "stall_grad_ratio": _FRACTION,
    "stall_update_ratio": _FRACTION,
    "min_fraction": _FRACTION,
    "stall_loss_level": _FRACTION,
    "min_depth": Range("int", 2, 10 ** 6),
    "vanish_time_orders": _ORDERS,
    "explode_rise_orders": _ORDERS,
    "explode_z": _POSITIVE,
    "explode_grad_ratio": _POSITIVE,
    "explode_depth_orders": _ORDERS,
    "explode_layer_ratio": _POSITIVE,
    "explode_over_start_orders": Range("real", 0, 100),
    "explode_min_steps": _STEPS,
    "baseline_window": Range("int", 2, 10_000),
    "baseline_min": Range("int", 1, 10_000),  # and at most baseline_window
    "amp_overflow_fraction": _FRACTION,
    "amp_min_scale": Range("real", 0, None),
    "amp_stalled_fraction": _FRACTION,
    "amp_grad_ratio": _POSITIVE,
    "amp_pow2_tol": Range("real", 0, 0.5, lo_open=True, hi_open=True),
    "amp_min_log2": Range("int", 1, 127),
    "spike_z": _POSITIVE,
    "spike_factor": Range("real", 1, None),
    "spike_min_jump": Range("real", 0, None),
    "spike_min_history": Range("int", 1, 10_000),
    "trend_p": Range("real", 0, 1, lo_open=True, hi_open=True),
    "trend_min_steps": _STEPS,
    "trend_max_points": Range("int", 4, 10 ** 7),
    "converged_fall": Range("real", 1, None, lo_open=True),
    "early_spike_factor": Range("real", 1, None, lo_open=True),
    "early_lm_spike_factor": Range("real", 1, None, lo_open=True),
    "saturated_fraction": _FRACTION,
    "dead_fraction": _FRACTION,
    "init_std_orders": _ORDERS,
    "init_gain_orders": _ORDERS,
    "init_max_step": Range("int", 0, 10 ** 9),
    "init_gain_high": _POSITIVE,
    "init_embed_rms_high": _POSITIVE,
    "init_loss_factor": Range("real", 1, None, lo_open=True),
    "input_orders": _ORDERS,
    "input_z": _POSITIVE,
    "large_update_ratio": _POSITIVE,
    "zero_init_rms": Range("real", 0, None),
    "attn_logit_level": _POSITIVE,
    "attn_logit_growth": Range("real", 1, None, lo_open=True),
    "logz_level": _POSITIVE,
    "update_spike_factor": Range("real", 1, None, lo_open=True),
}
