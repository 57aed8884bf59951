"""What the guard and rollback did in a recorded run: the one definition of an event that changed the training.

Reads the events the guard writes (kind "guard": per-step reports such as `clip_norm.coef`;
kind "skipped_step": the bad tensors) and rollback writes (kind "rollback"). `acted` decides,
event by event, which of them changed the training: the runs summary (through `interventions`),
the report's loss plot and the lab read that one decision.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

# Event kinds that record what was seen, not an action on the training (a "structure" event is watch's
# first-step record of the model's residual blocks, see graddoctor.core._structure).
OBSERVATIONS = frozenset({"finding", "note", "structure"})


def _acted(key: str, value: float) -> bool:
    """Whether one report value means the transform changed the gradients that step."""
    if key.endswith("coef") or key.endswith("min_coef"):
        return value < 1.0
    return value > 0  # counts and fractions: clipped tensors / units, skipped


def _guard_values(event: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """A guard event's finite numeric report values, as (key, value)."""
    for key, value in (event.get("data") or {}).items():
        v = value[0] if isinstance(value, list) and value else value
        if isinstance(v, (int, float)) and math.isfinite(v):
            yield key, float(v)


def acted(event: dict[str, Any]) -> bool:
    """Whether a recorded event changed the training.

    A guard event only if one of its transforms acted (a coefficient below 1, a clipped count or
    fraction above 0); an observation (a finding, a note, the model's structure) never; any other
    kind (a skipped step, a rollback, a kind of the user's own) always.
    """
    kind = event.get("kind")
    if kind in OBSERVATIONS:
        return False
    return kind != "guard" or any(_acted(key, value) for key, value in _guard_values(event))


def intervention_steps(run: Any) -> list[int]:
    """The steps of an open `graddoctor.Run` on which a recorded intervention acted (see `acted`)."""
    return sorted({int(e["step"]) for e in run.events() if acted(e)})


def interventions(run: Any) -> list[dict[str, Any]]:
    """One summary per intervention kind: what, on how many steps, first/last step, strongest value.

    Args:
      run: an open `graddoctor.Run`.
    Returns:
      Dicts with keys `what`, `steps` (count), `first_step`, `last_step`, `extreme` (smallest
      coefficient or largest count, None for skips and rollbacks) and `detail`.
    """
    per_key: dict[str, list[tuple[int, float]]] = {}
    for e in run.events("guard"):  # per report key, by the rule `acted` applies to the whole event
        for key, value in _guard_values(e):
            if _acted(key, value):
                per_key.setdefault(key, []).append((e["step"], value))
    out = []
    for key, hits in sorted(per_key.items()):
        values = [v for _, v in hits]
        extreme = min(values) if "coef" in key else max(values)
        out.append(dict(what=key, steps=len(hits), first_step=hits[0][0], last_step=hits[-1][0], extreme=extreme,
                        detail=f"{'smallest coefficient' if 'coef' in key else 'largest value'} {extreme:.3g}"))
    skipped = run.events("skipped_step")
    if skipped:
        layers = sorted({n for e in skipped for n in e["data"].get("bad", [])[:3]})
        out.append(dict(what="skipped_step", steps=len(skipped), first_step=skipped[0]["step"],
                        last_step=skipped[-1]["step"], extreme=None, detail="non-finite in " + ", ".join(layers[:5])))
    rollbacks = run.events("rollback")
    if rollbacks:
        out.append(dict(what="rollback", steps=len(rollbacks), first_step=rollbacks[0]["step"],
                        last_step=rollbacks[-1]["step"], extreme=None,
                        detail="; ".join(f"step {e['step']} -> {e['data'].get('restored_step')}: "
                                         f"{e['data'].get('reason')}" for e in rollbacks[:3])))
    return out


def format_interventions(run: Any) -> str:
    """The interventions as text, one line each (empty string if there were none)."""
    lines = [f"  {i['what']}: {i['steps']} step(s), {i['first_step']}-{i['last_step']}; {i['detail']}"
             for i in interventions(run)]
    return ("Interventions (treat):\n" + "\n".join(lines) + "\n") if lines else ""
