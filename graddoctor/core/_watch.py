"""watch: record every step's gradient health on the device, write it to the run store at each flush.

    w = gd.watch(model, run_dir="runs/exp1")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(); loss.backward()
        w.step(loss)        # after backward (all of it, if you accumulate), before optimizer.step()
        optimizer.step()
    w.close()

Sync points (the only places values reach the host):
- `flush()`, every `config.flush_every` steps, in `close()`, and when called by hand.
Nothing else in `step()` or in the hooks syncs: statistics are device tensors
appended to per-series buffers.

Distributed: every rank may create a watcher. Only rank 0 records and writes;
the others do no monitoring work, so they never wait for rank 0, unless
gradients are sharded (DTensor/FSDP2), where every rank takes part in the
statistics' all-reduce, as every rank does in `clip_grad_norm_`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, cast

import numpy as np
import torch
from torch import Tensor, nn

from .._errors import WatchClosedError
from ..store._series import BY_NAME, FIELDS_META
from ..store._store import RunWriter, run_dir_path
from . import _amp, _exit, _native
from ._act_hooks import ActivationHooks, find_sites
from ._activations import first_tensor, input_row
from ._config import WatchConfig
from ._params import check_dense_grads, check_measurable, rank, unwrap, unwrap_optimizer, watched_parameters, world_size
from ._rnn_time import TimeHooks, time_modules
from ._sampled_hooks import SampledHooks
from ._signals import SignalHooks
from ._snapshot import UpdateSnapshot, is_bounded
from ._stats import TensorStats, grad_and_weight_stats, group_by_device_dtype, is_dtensor, tensor_stats
from ._structure import StructureProbe


def to_host(tensors: list[Tensor]) -> list[np.ndarray]:
    """Copy device tensors to numpy with one transfer per (device, dtype).

    note: this is a CPU-GPU sync point; `Watch.flush` is its only caller in the step path.
    """
    out: list[Optional[np.ndarray]] = [None] * len(tensors)
    for idx in group_by_device_dtype(tensors).values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).cpu().numpy()
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].reshape(tensors[i].shape)
            offset += n
    return cast(list[np.ndarray], out)  # every index is in one group, so none is left None


class Watch:
    """Records gradient health for one model. Create it with `graddoctor.watch(...)`.

    Attributes:
      step_index: the number of `step()` calls so far (the step the next call records).
      latest: `TensorStats` of the last recorded step (device tensors), for remedies to reuse.
      names: names of the watched parameter tensors, in the order of every per-tensor vector.
      update_snapshot: the `UpdateSnapshot` behind the `update_norm` series (its `meta()` says which
        tensors each sample measures).
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 run_dir: Optional[str | Path] = None, config: Optional[WatchConfig] = None, guard: Any = None,
                 scaler: Any = None):
        """Use `graddoctor.watch(...)`, which also builds the guard and attaches live diagnosis.

        Args:
          guard: None, or an object with `apply(stats, record_event, step)` run on every step's
            statistics (`graddoctor.treat.Guard`); its parameters must be `watched_parameters(model)`.
        """
        self.config = config or WatchConfig()
        self.config.validate()
        self.model = unwrap(model)
        self.optimizer = unwrap_optimizer(optimizer)  # Accelerate's and Lightning's wrappers: the real optimizer
        optimizer = self.optimizer
        # AMP: a GradScaler whose gradients are unscaled before they are measured (see graddoctor.core._amp)
        self.scaler = _amp.check_scaler(scaler, optimizer)
        named = watched_parameters(model)
        check_measurable(self.model, named, run_dir)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        first = self.params[0]
        self.stats_device = first.to_local().device if is_dtensor(first) else first.device
        self.config = self.config.for_device(self.stats_device)  # e.g. weight_every: 1 on the CPU, 10 elsewhere
        self.rank = rank()
        if self.stats_device.type == "cpu":
            _native.prepare()  # a first build compiles (under a second): here, not inside the first step
        self._sharded = any(is_dtensor(p) for p in self.params)
        self.recording = self.rank == 0 and run_dir is not None
        self.guard = guard  # run on the stats of every step, after they are recorded
        self.run_dir = None if run_dir is None else run_dir_path(run_dir)  # checked on every rank
        compiled = model is not self.model and hasattr(model, "_orig_mod")
        # Only the recording rank hooks activations (and probes the model's modules to find them).
        sites, self.activations_off = (find_sites(self.model, compiled, self.config.activation_every)
                                       if self.recording else ([], None))
        self._acts = ActivationHooks(sites, self.config.saturation_margin, self.stats_device)
        # the gradient through time of recurrent layers, on the same sampled steps (graddoctor.core._rnn_time)
        self._time = TimeHooks(time_modules(self.model) if self.recording and not compiled else [], self.stats_device)
        # attention logits and log Z, on the same sampled steps (graddoctor.core._signals)
        self._signals = SignalHooks(self.model if self.recording and not compiled else None, self.stats_device)
        # every hook that exists only on a sampled step, in the order their series are recorded
        self._sampled: tuple[SampledHooks, ...] = (self._acts, self._signals, self._time)
        self.step_index = 0  # a resumed run continues at the writer's next step (below)
        self.latest: Optional[TensorStats] = None
        self._flush_listeners: list[Callable[["Watch", int, int, list], None]] = []
        self._reset_buffers()
        self._input_acc: Optional[Tensor] = None
        # the update norm's weight snapshot: full on the CPU, bounded by the largest tensor elsewhere
        self.update_snapshot = UpdateSnapshot(self.params, self.stats_device, self.config.sample_every,
                                       bounded=is_bounded(self.stats_device))
        self._input_handle = None
        self._structure: Optional[StructureProbe] = None  # residual blocks, read at the first training forward
        self._writer: Optional[RunWriter] = None
        if self.recording:
            if self.activations_off is not None and self.config.activation_every:
                warnings.warn(f"graddoctor: activation statistics off: {self.activations_off}", RuntimeWarning,
                              stacklevel=3)
            self._writer = self._open_writer(model)
            self.step_index = self._writer.next_step
            if self.config.input_stats:
                self._input_handle = model.register_forward_pre_hook(self._on_input, with_kwargs=True)
            self._maybe_install_sampled_hooks()
            self._structure = None if compiled else StructureProbe(self.model)
        self._optimizer_steps = 0
        self._optimizer_steps_at_last_step: Optional[int] = None
        self._optimizer_handle = (optimizer.register_step_post_hook(self._after_optimizer_step)
                                  if optimizer is not None else None)
        self._warned_double_step = False
        self._grads_checked = False
        self._warned_write = False
        self.live: Any = None  # live diagnosis, attached by graddoctor.watch() as a flush listener
        self.closed = False
        if self._writer is not None:
            _exit.register(self)  # flushed and closed at exit, on Ctrl-C and on SIGTERM (see graddoctor.core._exit)

    # ----------------------------------------------------------------- setup
    def _open_writer(self, model: nn.Module) -> RunWriter:
        assert self.run_dir is not None, "only a recording watch, which has a run_dir, opens a writer"
        modules = dict(self.model.named_modules())
        tensors = [dict(idx=i, name=n, module=n.rpartition(".")[0], shape=json_shape(p),
                        numel=p.numel(), dtype=str(p.dtype).replace("torch.", ""))
                   for i, (n, p) in enumerate(zip(self.names, self.params))]
        acts = [dict(idx=i, name=a.name, kind=a.kind.kind, lo=a.kind.bounds[0] if a.kind.bounds else None,
                     hi=a.kind.bounds[1] if a.kind.bounds else None, relu_family=int(a.kind.relu_family))
                for i, a in enumerate(self._acts.sites)]
        meta = dict(torch_version=torch.__version__, config=asdict(self.config), world_size=world_size(),
                    loss_rows="given",  # a loss row only where step() was given a loss (see Run.loss)
                    model_class=type(self.model).__name__,
                    compiled=model is not self.model and hasattr(model, "_orig_mod"),
                    activations_off=self.activations_off,  # why no activation is recorded (absent: older stores)
                    modules={n: type(m).__name__ for n, m in modules.items() if n},
                    **{key: list(BY_NAME[name].fields) for name, key in FIELDS_META.items()},
                    optimizer=type(self.optimizer).__name__ if self.optimizer is not None else None,
                    amp_scaler=_amp.scaler_meta(self.scaler) if self.scaler is not None else None,
                    lr=[g.get("lr") for g in self.optimizer.param_groups] if self.optimizer is not None else None,
                    time_modules=self._time.names,  # the time_grad series' module column indexes these
                    update_snapshot=self.update_snapshot.meta())  # which update norms each sample measured
        meta.update(self._signals.meta())  # the attention columns, named per model
        return RunWriter(self.run_dir, meta, tensors, acts,
                         overwrite=self.config.overwrite, resume=self.config.resume)

    def _reset_buffers(self) -> None:
        # series name -> (list of steps, list of device tensors); emptied at each flush
        self._buf: dict[str, tuple[list[int], list[Tensor]]] = {}
        self._events: list[tuple[int, str, dict]] = []

    def _push(self, series: str, step: int, value: Tensor) -> None:
        if not self.recording:
            return
        steps, values = self._buf.setdefault(series, ([], []))
        steps.append(step)
        values.append(value)

    # ----------------------------------------------------------------- hooks
    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Only training forwards count: evaluation under no_grad is not a training batch.
        x = first_tensor(args, kwargs)
        if x is None or not torch.is_grad_enabled():
            return
        row = input_row(x)
        if row.device != self.stats_device:
            row = row.to(self.stats_device, non_blocking=True)
        if self._input_acc is None:
            self._input_acc = row
        else:  # gradient accumulation: max of max-abs, sum of non-finite counts, last mean/std
            acc = self._input_acc
            self._input_acc = torch.stack([torch.maximum(acc[0], row[0]), acc[1] + row[1], row[2], row[3]])

    def _weights_due(self, step: int) -> bool:
        every = self.config.weight_every
        assert every is not None, "for_device has chosen it"
        return step % every == 0

    def _is_activation_step(self, step: int) -> bool:
        every = self.config.activation_every
        return bool(every) and step % every == 0

    def _maybe_install_sampled_hooks(self) -> None:
        """Install the sampled-step hooks for the coming step's forward, if it is a sampled step."""
        if self._is_activation_step(self.step_index):
            for hooks in self._sampled:
                hooks.install()  # a no-op with nothing to hook

    def add_flush_listener(self, fn: Callable[["Watch", int, int, list], None]) -> None:
        """Call `fn(watch, first_step, last_step, chunks)` after each flush has been written.

        `chunks` are the host arrays the flush just wrote, as (series, steps int64[n], data [n, width]),
        so a listener never has to read them back from the store.
        """
        self._flush_listeners.append(fn)

    # ------------------------------------------------------------------ step
    def step(self, loss: Optional[Tensor | float] = None) -> Optional[TensorStats]:
        """Record the current gradients (and the loss) as one step. No host sync (but see `flush`).

        Call it once per optimizer step, after the last backward and before `optimizer.step()`.
        A guard runs here too and adds its transforms' host syncs (`skip_nonfinite`: one; clips: none).

        Args:
          loss: the step's loss, a tensor (kept on its device) or a float; None records NaN.
        Returns:
          The step's `TensorStats` (device tensors), or None on a rank that does not record.
        """
        if self.closed:
            raise WatchClosedError("Watch.step() called after close(); create a new watch for a new run")
        self._check_one_step_per_optimizer_step()
        if not self._grads_checked:  # sparse gradients can come from more than nn.Embedding(sparse=True)
            check_dense_grads(self.names, self.params)
            self._grads_checked = True
        s = self.step_index
        stats, weight_norms = None, None
        # Under a GradScaler: the true gradients, and this step's loss scale and overflow flag. A guard
        # changes gradients in place, so they are unscaled for it; otherwise they are left as they are
        # and the scale is divided out of the statistics (see graddoctor.core._amp).
        amp, scale = None, None
        if self.scaler is not None:
            assert self.optimizer is not None, "check_scaler refuses a scaler without its optimizer"
            if self.guard is not None:
                amp = _amp.unscale_and_row(self.scaler, self.optimizer, self.stats_device)
            else:
                scale = _amp.scale_left_in(self.scaler, self.optimizer)
                if scale is None:  # the loop unscaled already: the scaler's own overflow flag
                    amp = _amp.unscale_and_row(self.scaler, self.optimizer, self.stats_device)
        # Sharded gradients: the weight/update norms are all-reduces too, so every rank computes
        # them (rank 0 alone keeps them, see `_push`).
        measure_weights = self.recording or self._sharded
        # With a guard every rank computes the stats: each DDP rank must apply the same clipping.
        if measure_weights or self.guard is not None:
            grads = [p.grad for p in self.params]
            # A step whose weight norms are due (and not taken by a sample's snapshot copy) reads
            # each weight beside its gradient, in the gradients' pass.
            if measure_weights and self._weights_due(s) and s % self.config.sample_every != 0:
                stats, weight_norms = grad_and_weight_stats(grads, self.params, self.stats_device)
            else:
                stats = tensor_stats(grads, self.stats_device)
            if scale is not None:
                amp = _amp.row_from_stats(self.scaler, stats, self.stats_device)
                stats = _amp.divide_out(stats, scale)
            self.latest = stats
        if measure_weights:
            assert stats is not None, "measured above"
            self._record(s, stats, loss, weight_norms, amp)
        if self.guard is not None:  # after recording, so the store keeps the gradients as backward made them
            self.guard.apply(stats, lambda kind, data, step: self.record_event(kind, data, step), s)
        if self._structure is not None and self._structure.done:  # recorded once, at the first step after it
            self.record_event("structure", self._structure.facts(self.optimizer), s)
            self._structure = None
        self.step_index += 1
        if self.recording:
            self._maybe_install_sampled_hooks()
            if self.step_index % self.config.flush_every == 0:
                self.flush()
        return stats

    def _record(self, s: int, stats: TensorStats, loss: Optional[Tensor | float], weight_norms: Optional[Tensor],
                amp: Optional[Tensor] = None) -> None:
        """Buffer step `s`'s statistics (`weight_norms`: taken with the gradients, or None; `amp`: the
        GradScaler's row, or None)."""
        if loss is not None:  # no loss: no row, so "missing" never reads as a NaN loss
            self._push("loss", s, _loss_tensor(loss, self.stats_device))
        if amp is not None:
            self._push("amp", s, amp)
        self._push("grad_total_norm", s, stats.total_norm)
        self._push("grad_norm", s, stats.norm)
        self._push("grad_maxabs", s, stats.maxabs)
        self._push("grad_nonfinite", s, stats.nonfinite)
        self._record_update()
        if s % self.config.sample_every == 0:  # the snapshot also yields the weight norms
            weight_norms = self.update_snapshot.take(s)
        if weight_norms is not None and self._weights_due(s):
            self._push("weight_norm", s, weight_norms)
        for hooks in self._sampled:
            for name, row in hooks.collect():  # [] unless sampled; the hooks are removed
                self._push(name, s, row)
        if self._input_acc is not None:
            self._push("input", s, self._input_acc)
            self._input_acc = None

    def _record_update(self) -> None:
        """Norm of the update the optimizer applied after the last sampled step (graddoctor.core._snapshot)."""
        taken = self.update_snapshot.update_norms()
        if taken is not None:
            self._push("update_norm", *taken)

    def record_event(self, kind: str, data: dict[str, Any], step: Optional[int] = None) -> None:
        """Record an event (an intervention, a note) for this step; tensor values are read at flush."""
        if self.closed:
            raise WatchClosedError(f"Watch.record_event({kind!r}) called after close(); events belong to an open run")
        if self.recording:
            self._events.append((self.step_index - 1 if step is None else step, kind, data))

    def write_event_now(self, step: int, kind: str, data: dict[str, Any]) -> None:
        """Write one event (host values only) at once, not at the next flush: e.g. a finding found by the
        flush that may be the run's last. Failures are kept and retried like a flush's."""
        if self._writer is not None and not self._writer.write([], [(step, kind, data)]):
            self._warn_write_failed()

    # ----------------------------------------------------------------- flush
    def flush(self) -> None:
        """Copy the buffered statistics to the host and write them to the store, as one transaction.

        note: this is the CPU-GPU sync point of graddoctor (one device-to-host copy per device and dtype).
        """
        if not self.recording:
            return
        series, events, rest = self._complete_steps()
        if not series and not events:
            return
        # Per-step scalars (loss, total norm) are buffered as 0-d tensors and stack to [n]; the
        # store reshapes each chunk to [n, width]. Losses come in the model's dtype: float64 here.
        tensors = [torch.stack(values).to(torch.float64) if name == "loss" else torch.stack(values)
                   for name, (_, values) in series]
        event_tensors = [(j, k, v) for j, (_, _, d) in enumerate(events) for k, v in d.items() if isinstance(v, Tensor)]
        host = to_host(tensors + [v for _, _, v in event_tensors])
        self._buf, self._events = rest  # only once on the host: a failed copy loses nothing
        chunks = [(name, np.asarray(steps, dtype=np.int64), host[i].reshape(len(steps), -1))
                  for i, (name, (steps, _)) in enumerate(series)]
        events = [(s, k, dict(d)) for s, k, d in events]
        for (j, key, _), value in zip(event_tensors, host[len(tensors):]):
            events[j][2][key] = value.tolist()
        first = min(int(c[1][0]) for c in chunks) if chunks else min(e[0] for e in events)
        last = max(int(c[1][-1]) for c in chunks) if chunks else max(e[0] for e in events)
        assert self._writer is not None, "a recording watch has a writer"
        with _exit.writing():  # a SIGTERM now waits for the write: a flush is never cut in half
            written = self._writer.write(chunks, events)
        if not written:
            self._warn_write_failed()
        for fn in self._flush_listeners:
            fn(self, first, last, chunks)

    def _complete_steps(self) -> tuple[list, list, tuple[dict, list]]:
        """The buffered series and events of the steps `step()` has finished, and the rest of the buffers.

        Everything is complete at a flush made by `step()` or `close()`. A flush made on the way
        out (Ctrl-C or SIGTERM in the middle of a `step()`) leaves the step in progress behind, so
        the store never holds half a step.
        """
        done = self.step_index
        series, kept = [], {}
        for name, (steps, values) in self._buf.items():
            n = len(steps)
            while n and steps[n - 1] >= done:
                n -= 1
            if n:
                series.append((name, (steps[:n], values[:n])))
            if n < len(steps):
                kept[name] = (steps[n:], values[n:])
        events = [e for e in self._events if e[0] < done]
        later = [e for e in self._events if e[0] >= done]
        return series, events, (kept, later)

    def _warn_write_failed(self) -> None:
        if self._warned_write:
            return
        self._warned_write = True
        writer = self._writer
        assert writer is not None, "only a write that failed warns"
        span = writer.pending_steps
        assert span is not None, "a failed write leaves its steps pending"
        warnings.warn(f"graddoctor: could not write steps {span[0]}-{span[1]} to {str(writer.path)!r} "
                      f"({writer.last_error}); they are kept in memory and written with the next flush. "
                      "Training goes on.", RuntimeWarning, stacklevel=3)

    def _after_optimizer_step(self, *_: Any) -> None:
        """The optimizer's step post-hook: count the step (to name a second `step()` with no optimizer
        step between), and take a due update norm right after the update that made it, so a sample
        costs one step (copy, step, difference) instead of two. Without an optimizer (or if its step is
        skipped) the next `step()` takes the update norm instead."""
        self._optimizer_steps += 1
        self._record_update()  # a no-op unless a sampled step left a snapshot

    def _check_one_step_per_optimizer_step(self) -> None:
        """Warn once when `step()` comes twice with no optimizer step between (a bug in the loop).

        Not judged under a GradScaler, whose `scaler.step` skips the optimizer step on an overflow.
        """
        if self._optimizer_handle is None or self.scaler is not None:
            return
        if self._optimizer_steps_at_last_step == self._optimizer_steps and not self._warned_double_step:
            self._warned_double_step = True
            warnings.warn(f"graddoctor: Watch.step() was called at step {self.step_index} with no optimizer.step() "
                          "since the previous call: call w.step(loss) once per optimizer step, after the last "
                          "backward (with gradient accumulation: after the last micro-batch)", RuntimeWarning,
                          stacklevel=3)
        self._optimizer_steps_at_last_step = self._optimizer_steps

    def close(self) -> None:
        """Flush what is buffered, remove every hook and close the store. Safe to call twice."""
        if self.closed:
            return
        if self.recording or self._sharded:
            self._record_update()
        if self.recording:
            for hooks in self._sampled:
                hooks.remove()
            self.flush()
        for handle in (self._input_handle, self._optimizer_handle, self._structure):
            if handle is not None:
                handle.remove()
        if self._writer is not None:
            self._writer.close()  # writes what earlier flushes could not, marks the run closed
            _exit.unregister(self)
            if self._writer.lost is not None:
                first, last, reason = self._writer.lost
                warnings.warn(f"graddoctor: steps {first}-{last} could not be written to {str(self._writer.path)!r} "
                              f"and are lost ({reason}); the steps before them are in the store", RuntimeWarning,
                              stacklevel=2)
        self.closed = True

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def json_shape(p: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in p.shape) + "]"


def _loss_tensor(loss: Optional[Tensor | float], device: torch.device) -> Tensor:
    """The step's loss as a 0-d tensor on `device` (the first entry of a loss with several).

    A tensor loss is only detached here (one op; it must not keep the autograd graph alive
    until the flush); the flush makes the float64 column of all buffered losses at once.
    """
    if loss is None:
        return torch.tensor(math.nan, dtype=torch.float64, device=device)
    if isinstance(loss, Tensor):
        value = loss.detach()
        if value.dim() != 0:
            value = value.reshape(-1)[0]
        return value if value.device == device else value.to(device, non_blocking=True)
    return torch.tensor(float(loss), dtype=torch.float64, device=device)
