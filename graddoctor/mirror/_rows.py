"""The rows a mirror writes: per step, the scalars summed up from one flush's host arrays.

Tags (see README, "Mirrors"):
  graddoctor/grad_norm            global gradient L2 norm (as stored: the norm of the per-tensor norms)
  graddoctor/grad_norm/<block>    a block's gradient norm: sqrt of the sum of its tensors' squared norms
  graddoctor/update_ratio         ||update|| / ||weight|| over all tensors, on sampled steps (sample_every)
  graddoctor/update_ratio/<block> the same per block
  (a bounded snapshot, on accelerators, measures a subset of the tensors per sample: the ratios are then over
  the tensors measured at that sample, and a block none of whose tensors was measured has no row)
  graddoctor/loss                 the loss given to step(), on the steps that had one
  graddoctor/nonfinite            1.0 on a step whose loss or global gradient norm is NaN or +-Inf, else 0.0
NaN and Inf are kept as they are; the flag is a stand-in for backends whose charts drop them (W&B).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..core._blocks import MAX_GROUPS, group_by_block
from ..core._snapshot import measured_mask
from ..store._run import _combine_norms

PREFIX = "graddoctor/"
GRAD_NORM = PREFIX + "grad_norm"
UPDATE_RATIO = PREFIX + "update_ratio"
LOSS = PREFIX + "loss"
NONFINITE = PREFIX + "nonfinite"
FINDINGS = PREFIX + "findings"
# Keep the weight norms of at most this many sampled steps waiting for their update norm (it comes
# with the next flush at the latest: the optimizer steps after the flush that holds its weights).
MAX_PENDING = 8

Rows = dict[int, dict[str, float]]


class RowMaker:
    """Turns each flush's chunks into rows {step: {tag: value}} (float64 sums, no device work).

    Args:
      names: the watched tensors' names (`watch.names`), the column order of every per-tensor series.
      sample_every: the watch's `sample_every`: the steps whose update norm will come.
      max_groups: the most blocks mirrored (see `graddoctor.core._blocks.group_by_block`).
      update_plan: the watch's `update_snapshot.meta()`: a bounded snapshot measures a subset of the
        tensors per sample, so a ratio covers the measured tensors only, and a block with none has no row.
    """

    def __init__(self, names: Sequence[str], sample_every: int, max_groups: int = MAX_GROUPS,
                 update_plan: Optional[dict] = None):
        groups = group_by_block(names, max_groups)
        self.blocks = list(groups)
        self._columns = [np.asarray(idx, dtype=np.int64) for idx in groups.values()]
        self.sample_every = sample_every
        self.update_plan = update_plan
        self._weights: dict[int, np.ndarray] = {}  # step -> weight norms [P], waiting for its update norm

    def rows(self, chunks: list) -> Rows:
        """The rows of one flush (`chunks` as given to a flush listener), keyed by step."""
        series = {name: (steps, data) for name, steps, data in chunks}
        out: Rows = {}
        if "grad_total_norm" in series:
            self._add_grad_rows(out, *series["grad_total_norm"], series.get("grad_norm"), series.get("loss"))
        if "weight_norm" in series:
            self._keep_sampled_weights(*series["weight_norm"])
        if "update_norm" in series:
            self._add_update_rows(out, *series["update_norm"])
        return out

    def _add_grad_rows(self, out: Rows, steps: np.ndarray, total: np.ndarray, grad_norm, loss) -> None:
        blocks = self._block_norms(grad_norm[1]) if grad_norm is not None else None
        losses = dict(zip(loss[0].tolist(), loss[1][:, 0].tolist())) if loss is not None else {}
        for i, s in enumerate(steps.tolist()):
            row = out.setdefault(s, {})
            row[GRAD_NORM] = float(total[i, 0])
            if blocks is not None:
                row.update(zip((f"{GRAD_NORM}/{b}" for b in self.blocks), blocks[i].tolist()))
            if s in losses:
                row[LOSS] = float(losses[s])
            finite = np.isfinite(row[GRAD_NORM]) and np.isfinite(row.get(LOSS, 0.0))
            row[NONFINITE] = 0.0 if finite else 1.0

    def _keep_sampled_weights(self, steps: np.ndarray, weights: np.ndarray) -> None:
        for i, s in enumerate(steps.tolist()):
            if s % self.sample_every == 0:
                self._weights[s] = weights[i]
        for s in sorted(self._weights)[:-MAX_PENDING]:
            del self._weights[s]

    def _add_update_rows(self, out: Rows, steps: np.ndarray, updates: np.ndarray) -> None:
        for i, s in enumerate(steps.tolist()):
            weights = self._weights.pop(s, None)
            if weights is None:  # weight norms not recorded at that step (weight_every does not divide it)
                continue
            measured = measured_mask(self.update_plan, np.asarray([s]), len(weights))[0]
            # the tensors not measured at this sample are left out (0), never read as NaN
            u2, w2 = (np.where(measured, _squares(x), 0.0) for x in (updates[i], weights))
            row = out.setdefault(s, {})
            row[UPDATE_RATIO] = _ratio(u2.sum(), w2.sum())
            for b, cols in zip(self.blocks, self._columns):
                if measured[cols].any():
                    row[f"{UPDATE_RATIO}/{b}"] = _ratio(u2[cols].sum(), w2[cols].sum())
        if len(steps):  # a weight row older than the newest update will never be matched
            newest = int(steps[-1])
            self._weights = {s: w for s, w in self._weights.items() if s > newest}

    def _block_norms(self, norms: np.ndarray) -> np.ndarray:
        """[n, blocks]: each block's gradient norm, as the run reader combines them (float64; NaN and Inf
        carry through)."""
        return np.stack([_combine_norms(norms[:, cols]) for cols in self._columns], axis=1)


def _squares(x: np.ndarray) -> np.ndarray:
    return np.square(x.astype(np.float64))


def _ratio(update_sq: float, weight_sq: float) -> float:
    """||update|| / ||weight||; a zero weight norm gives Inf (or NaN for a zero update), as the division says."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.sqrt(np.float64(update_sq)) / np.sqrt(np.float64(weight_sq)))
