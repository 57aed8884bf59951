"""`graddoctor diagnose RUN_DIR [--json] [--fail-on {warning,critical}]`: a thin layer over `diagnose`."""
from __future__ import annotations

import argparse

from ._findings import SEVERITIES

# Exit status when --fail-on is met (0: below the bar; 2 is taken by library errors).
EXIT_FINDINGS = 1


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import run_dir
    p = sub.add_parser("diagnose", help="find vanishing/exploding gradients and their causes in a recorded run",
                       description="Turn a recorded run into findings with evidence, a cause and ranked remedies.")
    p.add_argument("run_dir", metavar="RUN_DIR", type=run_dir, help="a run directory written by graddoctor.watch")
    p.add_argument("--json", action="store_true", help="print the findings as a JSON document (schema in the README)")
    p.add_argument("--fail-on", choices=("warning", "critical"), default=None,
                   help=f"exit with status {EXIT_FINDINGS} if any finding is at least this severe (for CI)")
    p.add_argument("--set", metavar="NAME=VALUE", action="append", default=[], dest="options",
                   help="override a DiagnoseConfig threshold, e.g. --set spike_z=12 (repeatable)")
    p.set_defaults(func=run)


def _parse_options(items: list[str]) -> dict:
    """NAME=VALUE strings as DiagnoseConfig options (ints stay ints); bad input raises ConfigError."""
    from .._errors import ConfigError
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"--set {item!r} is not allowed: use NAME=NUMBER, e.g. --set spike_z=12")
    return out


def run(args: argparse.Namespace) -> int:
    from ..store._run import open_run
    from ..treat._interventions import interventions
    from ._config import DiagnoseConfig
    from ._data import RunData
    from ._diagnose import diagnose
    from ._format import format_findings, format_json
    config = DiagnoseConfig.from_options(_parse_options(args.options))  # refused before the run is read
    with open_run(args.run_dir) as r:
        data = RunData.from_run(r)
        treated = interventions(r)
    findings = diagnose(data, config=config)
    fmt = format_json if args.json else format_findings
    print(fmt(findings, run_dir=str(args.run_dir), steps=data.T, interventions=treated))
    if args.fail_on is not None:
        bar = SEVERITIES.index(args.fail_on)
        if any(f.rank >= bar for f in findings):
            return EXIT_FINDINGS
    return 0
