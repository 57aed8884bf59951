"""The rows of the per-run views: one per block for a large model, one per layer for a small one.

A GPT's ~150 tensors as ~150 heat-map rows cannot be read, nor labelled. From `PER_LAYER_BELOW` tensors
on, the heat map and the profiles show one row per block (`transformer.h.3`), as
`graddoctor.core._blocks` defines blocks (the mirrors read the same definition), and a block's gradient
norm is the L2 norm of all its tensors' gradients: the sqrt of the sum of their squared norms. A
smaller model keeps one row per layer (the module that owns the tensors).

The activation panel has one entry per activation module, named with its block; beyond `MAX_GROUPS`
modules (a 100-layer ResNet's ReLUs) one per group of `group_by_block`, showing its largest fraction.

Labels are shortened from the left, whole name components first, so the distinctive right end stays
(`…h.3.attn.c_attn.weight`), and never two rows with one label.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core._blocks import MAX_GROUPS, group_by_block
from ..store._run import Run, _combine_norms

# Models with fewer watched tensors than this keep one row per layer (a small MLP's few modules).
PER_LAYER_BELOW = 20
LABEL_WIDTH = 24  # characters of a heat-map or profile label
ACT_LABEL_WIDTH = 14  # an activation's label: its block and module (`…h.3.mlp.act`), under a bar


@dataclass(frozen=True)
class GradRows:
    """Gradient norms per row: `values[t, r]` is row r's norm at `steps[t]` (float64; NaN: no gradient)."""

    by_block: bool              # rows are blocks (else layers)
    names: list[str]            # block or layer names, input side first
    labels: list[str]           # what the plots print (`short_labels(names)`)
    tensors: list[list[str]]    # each row's tensors
    steps: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class ActRows:
    """Per activation module (or group, `grouped`): the fraction saturated (bounded) or exactly zero (ReLU
    family) at two steps; a group's is the largest of its modules'."""

    grouped: bool
    names: list[str]
    labels: list[str]
    relu_family: list[bool]
    steps: list[int]            # the first and the last sampled step
    values: np.ndarray          # [2, modules]


def grad_rows(run: Run) -> GradRows:
    """The heat map's and the profiles' rows of an open run (see the module docstring)."""
    by_block = len(run.tensors) >= PER_LAYER_BELOW
    if by_block:
        groups = group_by_block(run.tensors)
    else:
        column = {t: i for i, t in enumerate(run.tensors)}
        groups = {layer: [column[t] for t in run.tensors if run.tensor_module[t] == layer] for layer in run.layers}
    steps, norms = run.series("grad_norm")
    _, counts = run.series("grad_nonfinite")
    if norms is None or counts is None:
        norms = np.zeros((0, len(run.tensors)))
        counts = np.zeros((0, len(run.tensors)), dtype=np.int64)
    # A tensor without a gradient that step (count -1) is left out of its row, as in `Run.layer_history`.
    values = [_combine_norms(norms[:, cols], counts[:, cols] >= 0) for cols in groups.values()]
    names = list(groups)
    return GradRows(by_block=by_block, names=names, labels=short_labels(names, LABEL_WIDTH),
                    tensors=[[run.tensors[i] for i in cols] for cols in groups.values()], steps=steps,
                    values=np.stack(values, axis=1) if values else np.zeros((len(steps), 0)))


def act_rows(run: Run) -> ActRows | None:
    """The activation panel's entries of an open run; None without sampled activation statistics."""
    steps, acts = run.activations()
    mods = run.activation_modules
    if len(steps) == 0 or not mods:
        return None
    relu = [run.activation_relu_family.get(m, False) for m in mods]
    col = np.array([3 if r else 2 for r in relu])  # frac_zero for the ReLU family, frac_saturated otherwise
    at = np.arange(len(mods))
    values = np.stack([acts[0, at, col], acts[-1, at, col]]).astype(np.float64)
    groups = group_by_block(mods) if len(mods) > MAX_GROUPS else {m: [i] for i, m in enumerate(mods)}
    names = list(groups)
    return ActRows(grouped=len(mods) > MAX_GROUPS, names=names, labels=short_labels(names, ACT_LABEL_WIDTH),
                   relu_family=[all(relu[i] for i in cols) for cols in groups.values()],
                   steps=[int(steps[0]), int(steps[-1])],
                   values=np.stack([values[:, cols].max(axis=1) for cols in groups.values()], axis=1))


def short_labels(names: list[str], width: int) -> list[str]:
    """`names` shortened from the left to about `width` characters, all distinct.

    Whole leading components go first (`transformer.h.3.mlp.act` -> `…h.3.mlp.act`); a last component
    longer than `width` is cut by characters. Names whose short forms would coincide (`…mlp.act` of two
    blocks) are given more of their name until they differ; the full names always do.
    """
    names = [n or "(root)" for n in names]
    labels = [_short(n, width) for n in names]
    w = width
    while len(set(labels)) < len(labels) and w < max(len(n) for n in names):
        w += 4
        seen: dict[str, int] = {}
        for label in labels:
            seen[label] = seen.get(label, 0) + 1
        labels = [_short(n, w) if seen[label] > 1 else label for n, label in zip(names, labels)]
    return labels if len(set(labels)) == len(labels) else names


def _short(name: str, width: int) -> str:
    """`name` if it fits in `width`; else its last components that fit after "…", or its last characters."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        tail = ".".join(parts[i:])
        if len(tail) + 1 <= width:
            return "…" + tail
    return "…" + name[-(width - 1):]
