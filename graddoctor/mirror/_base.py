"""The `Mirror` interface: where graddoctor's per-flush rows go (TensorBoard, W&B, MLflow, or your own)."""
from __future__ import annotations


class Mirror:
    """Receives graddoctor's statistics once per flush; subclass it to send them somewhere else.

    graddoctor calls `scalars` once per step of the flush (steps ascending; a later flush may add a
    step's update ratio to a step written before, as its update norm comes one flush later), `text`
    for each new finding, then `flush` once. Values are Python floats and may be NaN or +-Inf.
    An exception from any method turns the mirror off for the rest of the run, with one warning.
    """

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Write `values` ({tag: value}) at training step `step`."""
        raise NotImplementedError(f"{type(self).__name__}.scalars")

    def text(self, step: int, tag: str, text: str) -> None:
        """Write `text` under `tag` at step `step` (a diagnosis finding)."""
        raise NotImplementedError(f"{type(self).__name__}.text")

    def flush(self) -> None:
        """Called after each flush's rows and texts: push them to the backend (default: nothing to do)."""
