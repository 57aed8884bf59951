"""`graddoctor runs summary`: a readable table of one run. format_* returns text; the CLI prints it."""
from __future__ import annotations

import time

import numpy as np

from ..core._amp import overflowed
from ..store._run import Run


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "nan"
    if np.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}" if x != 0 else "0"


def _finite_range(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return "no finite value"
    return f"{_fmt(float(finite.min()))} .. {_fmt(float(finite.max()))}"


def nonfinite_steps(run: Run) -> np.ndarray:
    """Steps on which any gradient entry, the loss or the global norm was NaN/Inf."""
    steps, count = run.series("grad_nonfinite")
    if count is None:
        return np.zeros(0, dtype=np.int64)
    loss_steps, loss = run.loss()  # only the steps given a loss: a missing loss is not a bad one
    bad = steps[(count > 0).any(axis=1)]
    return np.union1d(bad, loss_steps[~np.isfinite(loss)]).astype(np.int64)


def format_steps(steps: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(s)) for s in steps[:limit])
    return shown + (f", ... ({len(steps)} in all)" if len(steps) > limit else "")


def format_amp(run: Run) -> str:
    """One line on a GradScaler's loss scale and the steps it skipped; "" for a run watched without one."""
    steps, amp = run.amp()
    if not len(steps):
        return ""
    skipped = steps[overflowed(amp)]
    return (f"AMP loss scale: {_fmt(float(amp[0, 0]))} at step {int(steps[0])} -> {_fmt(float(amp[-1, 0]))} at step "
            f"{int(steps[-1])}; steps the GradScaler skipped for an overflow: "
            + (format_steps(skipped) if len(skipped) else "none"))


def format_activations(run: Run) -> str:
    """One line on the activation statistics: why they are off, or how often they are sampled.

    "" for a store written before watch recorded why (no `activations_off` in its meta).
    """
    if "activations_off" not in run.meta:
        return ""
    off = run.meta["activations_off"]
    if off is not None:
        return f"activation statistics: off ({off})"
    every = (run.meta.get("config") or {}).get("activation_every")
    return "activation statistics: on" + (f", sampled every {every} steps" if isinstance(every, int) else "")


def format_summary(run: Run) -> str:
    """The summary table of a run as text."""
    loss_steps, loss = run.loss()
    steps, gnorm = run.global_norm()
    closed = run.meta.get("closed_at")
    state = (f"finished (watch closed it at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(closed))})"
             if isinstance(closed, (int, float)) else
             "not closed: still training, or the process ended without watch.close() (steps after the last "
             "flush are lost)")
    lines = [f"run: {run.run_dir}",
             f"state: {state}",
             f"steps: {len(steps)}   tensors: {len(run.tensors)}   layers: {len(run.layers)}   "
             f"activation modules: {len(run.activation_modules)}",
             f"last loss: {_fmt(float(loss[-1])) + f' (step {int(loss_steps[-1])})' if len(loss) else 'none recorded'}",
             f"global gradient norm range: {_finite_range(gnorm)}"]
    bad = nonfinite_steps(run)
    lines.append("non-finite steps: " + (format_steps(bad) if len(bad) else "none"))
    act_line = format_activations(run)
    if act_line:
        lines.append(act_line)
    amp_line = format_amp(run)
    if amp_line:
        lines.append(amp_line)
    findings = run.events("finding")
    if findings:
        codes = sorted({e["data"].get("code", "?") for e in findings})
        lines.append(f"findings recorded while training: {', '.join(codes)} "
                     f"(details: graddoctor diagnose {run.run_dir})")
    from ..treat import format_interventions  # treat builds on watch; imported late
    lines.append(format_interventions(run).rstrip() or "interventions: none")
    if not len(steps):
        return "\n".join(lines)
    header = ("layer", "first", "median", "last", "non-finite steps")
    rows = []
    for layer in run.layers:
        h = run.layer_history(layer)
        g = h.grad_norm
        present = g[~np.isnan(g) | (h.grad_nonfinite > 0)]
        first = _fmt(float(present[0])) if len(present) else "-"
        last = _fmt(float(present[-1])) if len(present) else "-"
        med = _fmt(float(np.nanmedian(g))) if np.isfinite(g).any() else "-"
        rows.append((layer or "(root)", first, med, last, str(int((h.grad_nonfinite > 0).sum()))))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines.append("")
    lines.append("gradient L2 norm per layer (input side first):")
    for r in [header] + rows:
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)
