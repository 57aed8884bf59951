"""Start-up cost of the command line: `graddoctor --help` against `python -c "import torch"`.

    .venv/bin/python benchmarks/cli_startup.py [--runs 15]

Each round runs, in turn, the baseline (`import torch`), an identical second baseline (the A/A
control: its ratio to the first shows the noise of this machine), and `graddoctor --help`, each as
a fresh process. Prints the medians and the ratios to the baseline's median.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import torch (A/A control)": [sys.executable, "-c", "import torch"],
    "graddoctor --help": [str(Path(sys.executable).with_name("graddoctor")), "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="rounds (default 15)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for r in range(args.runs):
        names = list(COMMANDS)
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
            start = time.perf_counter()
            subprocess.run(COMMANDS[name], check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["import torch"])
    print(f"{'command':30s} {'median s':>9s} {'ratio':>7s}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:30s} {med:9.3f} {med / base:7.3f}")


if __name__ == "__main__":
    main()
