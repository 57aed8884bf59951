"""What `graddoctor serve` costs per poll and per drawing, on a small run and on a long one.

Stores are written with graddoctor's RunWriter (as in diagnose_speed.py: healthy noise, an explosion
near the end). For each: the median time of one `/status` (what the page asks every --refresh
seconds), of one drawing of the run's section (heat map, profiles, loss, activations, diagnose),
and of one `/content` answered from the cache (the store unchanged). The drawing's cost sets how
often the dashboard draws a live run again (busy=0.1: a drawing of d seconds waits 9d).

    .venv/bin/python benchmarks/serve_cost.py [--steps 100000] [--tensors 200] [--repeats 5]
    .venv/bin/python benchmarks/serve_cost.py --folder runs/lab    # a folder of recorded runs

With --folder: how many runs the dashboard finds there, how long its first page takes (it draws
about a second's worth of runs and leaves the rest pending), and how long filling in every run takes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose_speed import store_arguments, write_store  # noqa: E402

from graddoctor.serve import Dashboard, run_status  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(run_dir: Path, repeats: int) -> dict[str, float]:
    status = median_seconds(lambda: run_status(run_dir), repeats * 10)

    def draw():
        Dashboard([run_dir], busy=1.0).content()  # a fresh dashboard: nothing cached

    drawing = median_seconds(draw, repeats)
    dash = Dashboard([run_dir])
    dash.content()
    cached = median_seconds(dash.content, repeats * 10)
    return dict(status=status, drawing=drawing, cached=cached)


def folder(path: Path) -> None:
    dash = Dashboard([path])
    t = time.perf_counter()
    dash.page()
    first = time.perf_counter() - t
    answers = 1
    while "pending" in dash.content()[1].split("|"):
        answers += 1
    print(f"{path}: {len(dash.runs())} runs; first page {first:.2f} s; "
          f"every run drawn after {time.perf_counter() - t:.1f} s ({answers} answers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=None, help="time the dashboard on this folder of runs instead")
    args = store_arguments(parser.description, parser)
    if args.folder is not None:
        folder(args.folder)
        return
    print("| store | /status (ms) | drawing a section (s) | /content from the cache (ms) | drawn again after (s, busy=0.1) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for steps, tensors in ((1000, 20), (args.steps, args.tensors)):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            write_store(run_dir, steps, tensors)
            m = measure(run_dir, args.repeats)
        print(f"| {steps:,} steps x {tensors} tensors | {m['status'] * 1e3:.2f} | {m['drawing']:.2f} | "
              f"{m['cached'] * 1e3:.2f} | {9 * m['drawing']:.0f} |")


if __name__ == "__main__":
    main()
