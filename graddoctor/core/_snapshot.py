"""The update norm ||w_after - w_before|| per tensor, from a snapshot of the weights taken on sampled steps.

A sampled step copies weights before the optimizer steps; right after it, the difference's L2 norm
is the update norm. Two ways to hold that copy:

- full (the CPU default): every tensor, every sample, in buffers kept and reused (a fresh 16 MB
  copy costs more in page faults than in copying), with the native kernel taking the weight
  norms while it copies. Host memory is the cheap resource there, and every row is complete.
- bounded (accelerators): the tensors are packed once into subsets whose total
  size is at most the largest tensor's (first fit, largest first), and the k-th sample copies
  only subset `k % n`. Extra device memory at any moment is at most the largest tensor, never a
  copy of the model, and every tensor is measured once every `n` samples. The copy is freed after use.

What the `update_norm` series then holds, at sampled step `s`: the update of the tensors of
subset `(s // sample_every) % n`, and NaN for the others ("not measured at this sample", not a
non-finite update). The run's metadata holds the plan (`update_snapshot`), and `measured_mask`
turns it back into the measured entries, so readers can tell the two NaNs apart.

`GRADDOCTOR_SNAPSHOT=bounded` (or `full`) in the environment overrides the choice by device, e.g.
for a large model trained on the CPU.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .._errors import ConfigError
from . import _native
from ._stats import is_dtensor, l2_norms


def is_bounded(device: torch.device) -> bool:
    """Whether a watch on `device` takes the bounded snapshot: off the CPU, unless `GRADDOCTOR_SNAPSHOT` says."""
    mode = os.environ.get("GRADDOCTOR_SNAPSHOT", "auto").strip().lower() or "auto"
    if mode not in ("auto", "full", "bounded"):
        raise ConfigError(f"GRADDOCTOR_SNAPSHOT={mode!r} is not allowed: use auto, full or bounded")
    return device.type != "cpu" if mode == "auto" else mode == "bounded"


def pack_subsets(sizes: Sequence[int], bound: int) -> list[list[int]]:
    """Tensor indices packed into subsets of total size <= `bound` (a tensor larger than it: alone).

    First fit, largest first: no two subsets could be merged, so there are fewer than
    `2 * sum(sizes) / bound + 1` of them. Each subset lists its indices in increasing order.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        k = next((b for b, r in enumerate(room) if sizes[i] <= r), None)
        if k is None:
            bins.append([i])
            room.append(bound - sizes[i])
        else:
            bins[k].append(i)
            room[k] -= sizes[i]
    return [sorted(b) for b in bins]


def measured_mask(plan: Optional[dict[str, Any]], steps: np.ndarray, n_tensors: int) -> np.ndarray:
    """bool [len(steps), P]: which update norms a run measured at its sampled `steps`.

    `plan` is the run metadata's `update_snapshot` (None: an older store or a full snapshot,
    where every tensor is measured at every sample).
    """
    steps = np.asarray(steps, dtype=np.int64)
    if not plan or plan.get("mode") != "bounded":
        return np.ones((len(steps), n_tensors), dtype=bool)
    subset_of = np.asarray(plan["subset_of"], dtype=np.int64)
    due = (steps // int(plan["sample_every"])) % int(plan["subsets"])
    return subset_of[None, :] == due[:, None]


class UpdateSnapshot:
    """Takes the weight snapshot of a sampled step and, after the optimizer step, the update norms.

    Args:
      params: the watched parameters (plain tensors or DTensors), in watch order.
      stats_device: where the norms go.
      sample_every: the watch's `sample_every` (which sample a step is).
      bounded: True for the bounded snapshot, False for the full one (see the module docstring).
    """

    def __init__(self, params: Sequence[Tensor], stats_device: torch.device, sample_every: int, bounded: bool):
        self.params = list(params)
        self.device = stats_device
        self.sample_every = sample_every
        self.bounded = bounded
        sizes = [p.numel() for p in self.params]
        self.bound = max(sizes, default=0) if bounded else sum(sizes)
        self.subsets = pack_subsets(sizes, self.bound) if bounded else [list(range(len(sizes)))]
        self._index = [torch.tensor(s, dtype=torch.long, device=stats_device) for s in self.subsets]
        self._buffers: Optional[list[Tensor]] = None  # the full snapshot's reused copies
        self._taken: Optional[tuple[int, int, list[Tensor]]] = None  # (step, subset, copies)
        self.copied_numel = 0  # elements copied by the last snapshot (what it holds beside the model)

    def meta(self) -> dict[str, Any]:
        """The plan, for the run's metadata (see `measured_mask`)."""
        if not self.bounded:
            return {"mode": "full"}
        subset_of = [0] * len(self.params)
        for k, members in enumerate(self.subsets):
            for i in members:
                subset_of[i] = k
        return {"mode": "bounded", "bound": self.bound, "subsets": len(self.subsets),
                "sample_every": self.sample_every, "subset_of": subset_of}

    def subset_at(self, step: int) -> int:
        return (step // self.sample_every) % len(self.subsets)

    def take(self, step: int) -> Tensor:
        """Copy the weights due at sampled `step`; return all weights' L2 norms (float32 [P]). No host sync."""
        if not self.bounded:
            copies, norms = self._take_full()
            self._taken = (step, 0, copies)
            return norms
        k = self.subset_at(step)
        copies = [self.params[i].detach().clone() for i in self.subsets[k]]
        self.copied_numel = sum(c.numel() for c in copies)
        self._taken = (step, k, copies)
        return l2_norms(self.params, self.device)  # a read of every weight, no copy

    def _take_full(self) -> tuple[list[Tensor], Tensor]:
        self.copied_numel = sum(p.numel() for p in self.params)
        if any(is_dtensor(p) for p in self.params):  # sharded weights on the CPU: a fresh copy of each shard
            return [p.detach().clone() for p in self.params], l2_norms(self.params, self.device)
        if self._buffers is None:
            self._buffers = [torch.empty_like(w, requires_grad=False) for w in self.params]
        norms = _native.copy_norms(self.params, self._buffers)  # one read: copy and norms (CPU float only)
        if norms is not None:
            return self._buffers, norms
        torch._foreach_copy_(self._buffers, [w.detach() for w in self.params])
        return self._buffers, l2_norms(self.params, self.device)

    def update_norms(self) -> Optional[tuple[int, Tensor]]:
        """(sampled step, float32 [P] update norms, NaN where not measured), or None without a snapshot.

        The snapshot is released. No host sync.
        """
        if self._taken is None:
            return None
        step, k, copies = self._taken
        self._taken = None
        weights = [self.params[i] for i in self.subsets[k]]
        norms = _native.diff_norms(weights, copies)  # one read of each, nothing written (None for DTensors)
        if norms is None:
            torch._foreach_sub_(copies, [w.detach() for w in weights])  # in place: no second copy
            norms = l2_norms(copies, self.device)
        if not self.bounded:
            return step, norms
        row = torch.full((len(self.params),), math.nan, dtype=norms.dtype, device=self.device)
        return step, row.index_copy_(0, self._index[k], norms)
