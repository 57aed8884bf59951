"""Finding: one diagnosed problem, with where, why and what to do. The JSON document's unit."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

CODES = ("vanishing_gradient", "exploding_gradient", "nonfinite_gradient", "loss_spike", "loss_not_decreasing",
         "saturated_activation", "dead_relu", "poor_initialization", "input_outlier", "large_weight_update",
         "attention_logit_growth", "output_logit_divergence")
SEVERITIES = ("info", "warning", "critical")
CAUSES = ("activation", "initialization", "data", "learning_rate", "depth", "recurrence", "architecture",
          "mixed_precision", "unknown")


@dataclass(frozen=True)
class Remedy:
    """One ranked remedy of a finding: a catalogue id, a one-line reason and a code snippet.

    `aliases` are the id's former names (written to JSON only when there are some), so a consumer
    that matches an old id keeps working.
    """

    id: str
    why: str
    snippet: str
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "why": self.why, "snippet": self.snippet}
        if self.aliases:
            d["aliases"] = list(self.aliases)
        return d


@dataclass(frozen=True)
class Finding:
    """A diagnosed problem.

    Attributes:
      code: one of `CODES` (stable strings, used as they are in the JSON output).
      severity: "info", "warning" or "critical".
      first_step, last_step: the step range the evidence covers.
      layers: parameter or module names, most affected first.
      evidence: the numbers that triggered it (JSON-ready), with `reasoning` for the cause.
      cause: one of `CAUSES`.
      message: one plain sentence for people.
      remedies: ranked remedies (filled in by `diagnose` from the catalogue).
    """

    code: str
    severity: str
    first_step: int
    last_step: int
    layers: tuple[str, ...]
    evidence: dict[str, Any]
    cause: str
    message: str
    remedies: tuple[Remedy, ...] = field(default=())

    def __post_init__(self) -> None:
        # Internal invariants (rules build findings, users do not), so these are programming errors.
        if self.code not in CODES or self.severity not in SEVERITIES or self.cause not in CAUSES:
            raise ValueError(f"bad finding: code={self.code!r} severity={self.severity!r} cause={self.cause!r}")

    @property
    def rank(self) -> int:
        return SEVERITIES.index(self.severity)

    def with_remedies(self, remedies: tuple[Remedy, ...]) -> "Finding":
        return replace(self, remedies=tuple(remedies))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form documented in the README (non-finite floats allowed: use `_nonfinite_json`)."""
        return {"code": self.code, "severity": self.severity, "first_step": int(self.first_step),
                "last_step": int(self.last_step), "layers": list(self.layers), "evidence": self.evidence,
                "cause": self.cause, "message": self.message, "remedies": [r.to_dict() for r in self.remedies]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Finding":
        return cls(code=d["code"], severity=d["severity"], first_step=int(d["first_step"]),
                   last_step=int(d["last_step"]), layers=tuple(d.get("layers", ())),
                   evidence=dict(d.get("evidence", {})), cause=d["cause"], message=d.get("message", ""),
                   remedies=tuple(Remedy(r["id"], r["why"], r["snippet"], tuple(r.get("aliases", ())))
                                  for r in d.get("remedies", ())))
