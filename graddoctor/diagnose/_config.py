"""DiagnoseConfig: every threshold the rules use, with its default and where it comes from."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .._config import config_from_options
from .._errors import ConfigError


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

    # --- inputs and updates -------------------------------------------------------------
    # An input batch whose max-abs is this many orders above the running median ...
    input_orders: float = 1.0
    # ... and this many robust z-scores above it is an outlier.
    input_z: float = 6.0
    # Median update/weight ratio over layers above this at a sampled step is a large update
    # [Karpathy: ~1e-3 is healthy; 0.25 means a quarter of the weight's size in one step].
    large_update_ratio: float = 0.25

    # --- what counts as a weight ---------------------------------------------------------
    # Tensors with initial RMS below this are zero-initialised on purpose (residual branch ends,
    # ReZero scales) and are left out of ratio rules.
    zero_init_rms: float = 1e-6

    def validate(self) -> None:
        """Raise `ConfigError` naming the bad value and what is allowed."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v == v or v < 0:
                raise ConfigError(f"DiagnoseConfig.{f.name}={v!r} is not allowed: use a non-negative number")
        for name in ("min_fraction", "stall_loss_level", "saturated_fraction", "dead_fraction", "trend_p",
                     "amp_overflow_fraction", "amp_stalled_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"DiagnoseConfig.{name}={getattr(self, name)!r} is not allowed: use a fraction in (0, 1]")
        for name in ("min_depth", "explode_min_steps", "baseline_window", "baseline_min", "spike_min_history",
                     "trend_min_steps",
                     "trend_max_points"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"DiagnoseConfig.{name}={getattr(self, name)!r} is not allowed: use an integer >= 1")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "DiagnoseConfig":
        cfg = config_from_options(cls, options, "diagnose")
        cfg.validate()
        return cfg
