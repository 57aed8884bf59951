"""WatchConfig: what `watch` records and how often. One field, one comment."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from .._errors import ConfigError


@dataclass
class WatchConfig:
    # Steps between host copies and store writes: the only sync points. A killed
    # run loses at most this many steps.
    flush_every: int = 50
    # Weight L2 norms every k steps; None: 1 on the CPU, 10 on accelerators. Every step shows weight
    # growth at once; each costs one read of all the weights: on the CPU beside the gradients, ~0.6% of
    # the benchmark step; on a GPU as much as the gradients' whole fused pass (BENCHMARKS.md, issue 18).
    weight_every: Optional[int] = None
    # Update norms (so update/weight ratios) every k steps; each sample copies the weights
    # before the optimizer step and compares after it.
    sample_every: int = 10
    # Activation statistics every k steps; hooks exist only on those steps. 0: off.
    activation_every: int = 25
    # Max-abs, non-finite count, mean and std of every training batch (the model's first
    # argument, if it is a floating-point tensor: never a carried hidden state).
    input_stats: bool = True
    # An activation within this fraction of its range from a bound counts as
    # saturated (sigmoid: below 0.01 or above 0.99).
    saturation_margin: float = 0.01
    # Replace a run already recorded in run_dir instead of refusing.
    overwrite: bool = False
    # Continue the run recorded in run_dir (training resumed from a checkpoint): True continues at
    # the step after the last recorded one; a step number N continues at N, dropping recorded
    # steps >= N (a checkpoint older than the last flush). The model's tensors must match.
    resume: bool | int = False
    # Run the diagnosis rules at each flush (host data only, no extra sync) and report
    # each new finding once: logging, warnings, watch(on_finding=...), store event "finding".
    live_diagnosis: bool = True

    def validate(self) -> None:
        """Raise `ConfigError` naming the bad value and what is allowed."""
        _check_int("flush_every", self.flush_every, 1, MAX_FLUSH_EVERY,
                   "(every buffered step waits in memory until the flush)")
        for name in ("weight_every", "sample_every"):
            if name == "weight_every" and self.weight_every is None:
                continue  # chosen by the device (`for_device`)
            _check_int(name, getattr(self, name), 1, MAX_EVERY)
        _check_int("activation_every", self.activation_every, 0, MAX_EVERY, "(0 turns activation statistics off)")
        m = self.saturation_margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < m < 0.5:
            raise ConfigError(f"saturation_margin={m!r} is not allowed: use a number in (0, 0.5)")
        for name in ("input_stats", "overwrite", "live_diagnosis"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed: use True or False")
        r = self.resume
        if not isinstance(r, bool) and not (isinstance(r, int) and r >= 0):
            raise ConfigError(f"resume={r!r} is not allowed: use True, False, or the step number (>= 0) to continue at")
        if self.overwrite and r is not False:
            raise ConfigError(f"overwrite=True with resume={r!r} is not allowed: "
                              "replace the run, or continue it, not both")

    def for_device(self, device: Any) -> "WatchConfig":
        """This config with the device's defaults filled in: `weight_every` None is 1 on the CPU (the weights
        are read beside the gradients there) and 10 elsewhere."""
        if self.weight_every is not None:
            return self
        return replace(self, weight_every=1 if getattr(device, "type", device) == "cpu" else 10)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "WatchConfig":
        return config_from_options(cls, options, "watch")


MAX_FLUSH_EVERY = 100_000
MAX_EVERY = 10**9


def _check_int(name: str, value: Any, lo: int, hi: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is not allowed: use an integer in {lo}..{hi:_}"
                          + (f" {why}" if why else ""))


def resolve_config(config: Optional[WatchConfig], options: dict[str, Any]) -> WatchConfig:
    """The validated config of a `watch(config=..., **options)` call: `config`, or one built from the
    WatchConfig fields in `options`; refuses both at once."""
    if config is not None and options:
        raise ConfigError(f"give either config= or keyword options, not both (got options {sorted(options)})")
    if config is not None and not isinstance(config, WatchConfig):
        raise ConfigError(f"config={config!r} is not allowed: use a graddoctor.WatchConfig")
    config = config or WatchConfig.from_options(options)
    config.validate()
    return config


def config_from_options(cls: type, options: dict[str, Any], what: str) -> Any:
    """`cls(**options)` for a config dataclass, refusing unknown names with the list of allowed ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown}; allowed: {sorted(known)}")
    return cls(**options)
