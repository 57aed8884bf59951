"""Run-store size and read speed on a 100k-step x 200-tensor run (the storage budget in BENCHMARKS.md).

Builds the same synthetic store as diagnose_speed.py (real SQLite through RunWriter), then times,
each from a fresh `open_run`: one layer's history, one tensor's history, and the loss series.

Usage: python benchmarks/store_speed.py [--steps 100000] [--tensors 200] [--repeats 5]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import graddoctor as gd
from graddoctor.store._store import STORE_NAME

from diagnose_speed import store_arguments, timed, write_store


def main() -> None:
    args = store_arguments(__doc__.splitlines()[0])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()
        write_store(run_dir, args.steps, args.tensors)
        write_s = time.perf_counter() - t0
        size = (run_dir / STORE_NAME).stat().st_size
        run0 = gd.open_run(run_dir)
        layer, tensor = run0.layers[len(run0.layers) // 2], run0.tensors[len(run0.tensors) // 2]
        rows = [("write the store (all flushes)", write_s),
                ("open_run + layer_history(one layer)", timed(lambda: gd.open_run(run_dir).layer_history(layer), args.repeats)[0]),
                ("open_run + tensor_history(one tensor)", timed(lambda: gd.open_run(run_dir).tensor_history(tensor), args.repeats)[0]),
                ("open_run + loss()", timed(lambda: gd.open_run(run_dir).loss(), args.repeats)[0])]
    print(f"store: {args.steps} steps x {args.tensors} tensors, {size / 2**20:.0f} MiB on disk "
          f"({size / args.steps / args.tensors:.1f} bytes per step per tensor)")
    print("| work | median seconds |")
    print("| --- | ---: |")
    for name, s in rows:
        print(f"| {name} | {s:.3f} |")


if __name__ == "__main__":
    main()
