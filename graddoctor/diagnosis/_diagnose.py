"""diagnose: run every rule over a recorded run and return findings with ranked remedies."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..store._run import Run, open_run
from ._config import DiagnoseConfig
from ._data import RunData
from ._evidence import activation_class, fitting_init
from ._findings import Finding
from ._remedies import model_facts, present_remedies, rank_remedies
from ._rules_activation import dead_relu, poor_initialization, saturated_activation
from ._rules_amp import amp_scaler_not_passed, superseded_by_amp
from ._rules_gradient import exploding_gradient, nonfinite_gradient, vanishing_gradient
from ._rules_init import init_scale
from ._rules_loss import input_outlier, large_weight_update, loss_not_decreasing, loss_spike
from ._rules_time import merge_through_time, vanishing_through_time
from ._rules_transformer import attention_logit_growth, output_logit_divergence

Rule = Callable[[RunData, DiagnoseConfig], Optional[Finding]]


def poor_initialization_any(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """poor_initialization from the activation profile (`_rules_activation`) or, without one, from the weight
    scale against fan-in, the embeddings and an LM's step-0 loss (`_rules_init`)."""
    return poor_initialization(d, cfg) or init_scale(d, cfg)


def vanishing_any(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """vanishing_gradient across layers (`_rules_gradient`) or through time in recurrent layers (`_rules_time`)."""
    return merge_through_time(vanishing_gradient(d, cfg), vanishing_through_time(d, cfg))


# One rule per finding code (the stable codes listed in the README), in the order findings are
# reported at equal severity.
RULES: dict[str, Rule] = {
    "nonfinite_gradient": nonfinite_gradient,
    "exploding_gradient": exploding_gradient,
    "vanishing_gradient": vanishing_any,
    "poor_initialization": poor_initialization_any,
    "saturated_activation": saturated_activation,
    "dead_relu": dead_relu,
    "input_outlier": input_outlier,
    "large_weight_update": large_weight_update,
    "loss_spike": loss_spike,
    "loss_not_decreasing": loss_not_decreasing,
    "attention_logit_growth": attention_logit_growth,
    "output_logit_divergence": output_logit_divergence,
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
    facts = model_facts(data)  # only the remedies that apply to this model are ranked
    found = []
    for rule in RULES.values():
        f = rule(data, cfg)
        if f is not None:
            # A note that asks for no action (evidence action_needed=False) comes without remedies.
            needed = f.evidence.get("action_needed", True)
            found.append(f.with_remedies(rank_remedies(f, init, act, present, facts=facts) if needed else ()))
    amp = amp_scaler_not_passed(data, cfg)  # its remedy is its own: pass the scaler to watch
    if amp is not None:
        found = superseded_by_amp(found, amp, data)
    found = _explosion_over_vanishing(found, data, cfg)
    found = _explain_stalled_loss(found)
    order = list(RULES)
    after = _after_an_explosion(found)
    return sorted(found, key=lambda f: (-f.rank, f.code in after, order.index(f.code)))


# Findings that stop learning, in the order they explain a loss that does not decrease.
_EXPLAINS_STALL = ("vanishing_gradient", "dead_relu", "saturated_activation", "poor_initialization")


def _explosion_over_vanishing(found: list[Finding], d: RunData, cfg: DiagnoseConfig) -> list[Finding]:
    """Vanishing is never the headline while the gradients explode: when the global norm rose
    `explode_rise_orders` above its first value (or turned non-finite) and an explosion was found (exploding or
    non-finite gradients, or a loss that exploded in the first steps), a `vanishing_gradient` finding is the
    input side lagging behind an output side that blows up: it is dropped and noted on the explosion."""
    by_code = {f.code: f for f in found}
    vanish = by_code.get("vanishing_gradient")
    spike = by_code.get("loss_spike")
    boom = (by_code.get("nonfinite_gradient") or by_code.get("exploding_gradient")
            or (spike if spike is not None and "early_explosion" in spike.evidence else None))
    if vanish is None or boom is None or boom.evidence.get("action_needed", True) is False:
        return found
    g = d.global_norm.astype(np.float64)
    finite = np.flatnonzero(np.isfinite(g) & (g > 0))
    if not len(finite):
        return found
    turned_nonfinite = bool((~np.isfinite(g[finite[0]:])).any())
    rise = float(np.log10(np.max(g[finite]) / g[finite[0]]))
    if not (turned_nonfinite or rise >= cfg.explode_rise_orders):
        return found
    note = (f"the gradient norm rose 10^{rise:.1f} from its first value" + (" and turned non-finite" if turned_nonfinite
            else "") + f": {vanish.message} (dropped: the input side lags an exploding output side)")
    noted = replace(boom, evidence=dict(boom.evidence, vanishing_superseded=note))
    return [noted if f is boom else f for f in found if f is not vanish]


def _after_an_explosion(found: list[Finding]) -> frozenset[str]:
    """Codes listed after an explosion of the same severity: a vanishing gradient kept beside an explosion
    (the norm rose too little to drop it) is not the headline while the run blows up."""
    boom = any(f.code in ("nonfinite_gradient", "exploding_gradient") or "early_explosion" in f.evidence
               for f in found)
    return frozenset({"vanishing_gradient"}) if boom else frozenset()


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
