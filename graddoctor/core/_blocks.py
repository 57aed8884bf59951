"""Blocks: the parameter groups a person reads a model by (`transformer.h.3`, not its 12 tensors).

One definition, for every view that groups tensors (the mirrors today; the report and the dashboard
can read the same one). A block is a parameter name's prefix up to and including its first purely
numeric component (`transformer.h.3.attn.c_attn.weight` -> `transformer.h.3`, `layers.0.linear1.weight`
-> `layers.0`, `0.weight` -> `0`); a name without one belongs to its owning module (`transformer.wte.weight`
-> `transformer.wte`, `lm_head.weight` -> `lm_head`; a parameter of the root module, `scale`, is its own block).
"""
from __future__ import annotations

import math
from typing import Sequence

# Beyond this many blocks (a 200-layer model), neighbouring blocks are merged into runs of equal length,
# so a chart legend or a tag list stays readable and the per-flush work stays bounded.
MAX_GROUPS = 64


def block_of(name: str) -> str:
    """The block of a parameter named `name` (see the module docstring)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def group_by_block(names: Sequence[str], max_groups: int = MAX_GROUPS) -> dict[str, list[int]]:
    """Indices of `names` per block, blocks in order of first appearance.

    When there are more than `max_groups` blocks, runs of numbered siblings (`h.0`, `h.1`, ...) are merged
    into spans of equal length, the shortest that fit (`h.0-3`); the other blocks (embeddings, head) stay
    as they are. Where that cannot fit (more than `max_groups` unnumbered blocks), consecutive blocks are
    merged, named `first..last`.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups={max_groups!r}: use an integer >= 1")
    blocks: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        blocks.setdefault(block_of(name), []).append(i)
    if len(blocks) <= max_groups:
        return blocks
    families = _families(list(blocks))
    for span in range(2, max(len(f) for f in families) + 1):
        runs = [f[i:i + span] for f in families for i in range(0, len(f), span)]
        if len(runs) <= max_groups:
            return _merged(blocks, runs)
    span = math.ceil(len(blocks) / max_groups)
    keys = list(blocks)
    return _merged(blocks, [keys[i:i + span] for i in range(0, len(keys), span)])


def _families(keys: list[str]) -> list[list[str]]:
    """`keys` cut into runs of consecutive numbered siblings (`h.0`, `h.1`, ...); any other key is a run of one."""
    out: list[list[str]] = []
    parent = None
    for key in keys:
        head, _, last = key.rpartition(".")
        numbered = last.isdigit()
        if numbered and out and parent == head:
            out[-1].append(key)
        else:
            out.append([key])
        parent = head if numbered else None
    return out


def _merged(blocks: dict[str, list[int]], runs: list[list[str]]) -> dict[str, list[int]]:
    return {_span_name(r[0], r[-1]): sorted(i for k in r for i in blocks[k]) for r in runs}


def _span_name(first: str, last: str) -> str:
    if first == last:
        return first
    a, b = first.split("."), last.split(".")
    if len(a) == len(b) > 1 and a[:-1] == b[:-1] and a[-1].isdigit() and b[-1].isdigit():
        return ".".join(a[:-1] + [f"{a[-1]}-{b[-1]}"])
    return f"{first}..{last}"
