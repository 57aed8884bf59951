"""The activation hooks of a watch: installed before a sampled step's forward, removed after it.

Forward hooks on every activation at every step cost a lot (+57% on the reference GPU
workload), so they exist only on the steps `activation_every` samples. Each hook turns the
output it sees into one row of `ACT_FIELDS` on the device (`activation_row`); nothing syncs.
Where a site's activation is a function (`ActivationSite.function`), the hook applies it to
the output of the module that feeds it, on sampled steps only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..store._series import ACT_FIELDS
from ._activations import activation_row
from ._layers import ActivationSite, activation_sites
from ._sampled_hooks import SampledHooks


class ActivationHooks(SampledHooks):
    """The activation sites of one model, and the rows their hooks gather on a sampled step."""

    def __init__(self, sites: list[ActivationSite], saturation_margin: float, device: torch.device):
        super().__init__()
        self.sites = sites
        self._margin = saturation_margin
        self._device = device
        self._calls: dict[int, list[Tensor]] = {}

    def _register(self) -> list[RemovableHandle]:
        """A forward hook on every site."""
        return [site.module.register_forward_hook(self._hook(i, site)) for i, site in enumerate(self.sites)]

    def _hook(self, i: int, site: ActivationSite):
        def hook(_m: nn.Module, _inp: tuple, out: object) -> None:
            out = out[0] if isinstance(out, tuple) else out
            # Only training forwards count: evaluation under no_grad is not a training batch.
            if not isinstance(out, Tensor) or not torch.is_grad_enabled():
                return
            if site.function is not None:
                with torch.no_grad():  # the activation the layer applies next, out of the autograd graph
                    out = site.function(out.detach())
            row = activation_row(out, site.kind, self._margin)
            self._calls.setdefault(i, []).append(row.to(self._device))
        return hook

    def _rows(self) -> list[tuple[str, Tensor]]:
        """The step's `act` row, `[sites * len(ACT_FIELDS)]` (NaN for a site not called)."""
        nan_row = torch.full((len(ACT_FIELDS),), math.nan, device=self._device)
        rows = []
        for i in range(len(self.sites)):
            calls = self._calls.get(i)
            if not calls:
                rows.append(nan_row)
            elif len(calls) == 1:
                rows.append(calls[0])
            else:  # a module called several times in one step: average the fractions, sum the counts
                r = torch.stack(calls)
                rows.append(torch.cat([r[:, :-1].mean(0), r[:, -1:].sum(0)]))
        self._calls = {}
        return [("act", torch.cat(rows))]


def find_sites(model: nn.Module, compiled: bool, activation_every: int) -> tuple[list[ActivationSite],
                                                                                 Optional[str]]:
    """(the activation sites watch hooks, why activation statistics are off or None).

    The sites are listed whatever `activation_every` is (the run store's layout stays the same
    when a run is resumed with another), except under torch.compile, where watch hooks none.
    """
    name = type(model).__name__
    if compiled:
        return [], (f"{name} is compiled with torch.compile (hooks added and removed on sampled steps would make "
                    "it recompile; set activation_every=0 to silence this)")
    sites = activation_sites(model)
    if activation_every == 0:
        return sites, "activation_every=0"
    if not sites:
        return sites, (f"no activation modules found in {name} (activations called as functions in forward, such "
                       "as F.gelu(x), cannot be hooked; use an activation module such as nn.GELU(), or set "
                       "activation_every=0 to silence this)")
    return sites, None
