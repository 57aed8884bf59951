"""Hooks that exist only on a sampled step: installed before its forward, removed when it is recorded.

Forward hooks on every step cost a lot (+57% on the reference GPU workload for the activation
hooks alone), so the activation, transformer-signal and through-time hooks (`_act_hooks`,
`_signals`, `_rnn_time`) are all hooked only on the steps `activation_every` samples. This is
their one lifecycle; each subclass says what it hooks (`_register`) and what a step gives (`_rows`).
"""
from __future__ import annotations

from torch import Tensor
from torch.utils.hooks import RemovableHandle


class SampledHooks:
    """The handles of one kind of sampled-step hooks, and the step's rows they gathered."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        """Hook for the coming forward (a no-op if hooked already, or with nothing to hook)."""
        if not self._handles:
            self._handles = self._register()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def collect(self) -> list[tuple[str, Tensor]]:
        """The step's rows as (series, row), and the hooks removed; [] on a step that was not sampled."""
        if not self._handles:
            return []
        self.remove()
        return self._rows()

    def _register(self) -> list[RemovableHandle]:
        """Register this kind's hooks; their handles."""
        raise NotImplementedError

    def _rows(self) -> list[tuple[str, Tensor]]:
        """The rows the hooks gathered this step as (series, row), and the gathered state emptied."""
        raise NotImplementedError
