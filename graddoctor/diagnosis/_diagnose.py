"""diagnose: run every rule over a recorded run and return findings with ranked remedies."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from ..store._run import Run, open_run
from ._config import DiagnoseConfig
from ._data import RunData
from ._evidence import activation_class, fitting_init
from ._findings import Finding
from ._remedies import present_remedies, rank_remedies
from ._rules_activation import dead_relu, poor_initialization, saturated_activation
from ._rules_gradient import exploding_gradient, nonfinite_gradient, vanishing_gradient
from ._rules_loss import input_outlier, large_weight_update, loss_not_decreasing, loss_spike

Rule = Callable[[RunData, DiagnoseConfig], Optional[Finding]]

# One rule per finding code (the stable codes listed in the README), in the order findings are
# reported at equal severity.
RULES: dict[str, Rule] = {
    "nonfinite_gradient": nonfinite_gradient,
    "exploding_gradient": exploding_gradient,
    "vanishing_gradient": vanishing_gradient,
    "poor_initialization": poor_initialization,
    "saturated_activation": saturated_activation,
    "dead_relu": dead_relu,
    "input_outlier": input_outlier,
    "large_weight_update": large_weight_update,
    "loss_spike": loss_spike,
    "loss_not_decreasing": loss_not_decreasing,
}


def diagnose(run: Run | RunData | str | Path, config: Optional[DiagnoseConfig] = None, **options: Any) -> list[Finding]:
    """Diagnose a recorded run.

    Reads host data only (the run store, or a `RunData`); never touches a device.

    Args:
      run: a run directory, an open `Run`, or a `RunData`.
      config: a `DiagnoseConfig`; or give its fields as keyword options, e.g. `spike_z=10`.
    Returns:
      Findings, most severe first, each with evidence, a cause and ranked remedies.
    Raises:
      RunNotFoundError / CorruptStoreError for a bad run directory; ConfigError for bad options.
    """
    if config is not None and options:
        from .._errors import ConfigError
        raise ConfigError(f"give either config= or keyword options, not both (got options {sorted(options)})")
    cfg = config or DiagnoseConfig.from_options(options)
    cfg.validate()
    data = _as_data(run)
    data.zero_init_rms = cfg.zero_init_rms
    return diagnose_data(data, cfg)


def diagnose_data(data: RunData, cfg: DiagnoseConfig) -> list[Finding]:
    """Run every rule on host arrays; the order is severity, then `RULES` order."""
    data = data.without_scale_overflows()  # AMP: the steps a GradScaler skipped are not the model's
    init, act = fitting_init(data), activation_class(data)
    present = frozenset(present_remedies(set(data.modules.values())))
    found = []
    for rule in RULES.values():
        f = rule(data, cfg)
        if f is not None:
            # A note that asks for no action (evidence action_needed=False) comes without remedies.
            needed = f.evidence.get("action_needed", True)
            found.append(f.with_remedies(rank_remedies(f, init, act, present) if needed else ()))
    found = _explain_stalled_loss(found)
    order = list(RULES)
    return sorted(found, key=lambda f: (-f.rank, order.index(f.code)))


# Findings that stop learning, in the order they explain a loss that does not decrease.
_EXPLAINS_STALL = ("vanishing_gradient", "dead_relu", "saturated_activation", "poor_initialization")


def _explain_stalled_loss(found: list[Finding]) -> list[Finding]:
    """A flat loss with no cause of its own takes the cause (and remedies) of the finding that explains it."""
    by_code = {f.code: f for f in found}
    stall = by_code.get("loss_not_decreasing")
    if stall is None or stall.cause != "unknown":
        return found
    why = next((by_code[c] for c in _EXPLAINS_STALL if c in by_code), None)
    if why is None:
        return found
    ev = dict(stall.evidence, reasoning=f"the loss cannot decrease while {why.code} holds (cause: {why.cause}): "
                                        + str(why.evidence.get("reasoning", "")))
    linked = replace(stall, cause=why.cause, evidence=ev, remedies=why.remedies)
    return [linked if f is stall else f for f in found]


def _as_data(run: Run | RunData | str | Path) -> RunData:
    if isinstance(run, RunData):
        return replace(run)  # a shallow copy: cached views are per diagnosis
    if isinstance(run, Run):
        return RunData.from_run(run)
    with open_run(run) as r:
        return RunData.from_run(r)
