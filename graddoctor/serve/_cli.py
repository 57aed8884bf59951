"""The `graddoctor serve` command (registered by `graddoctor.cli`)."""
from __future__ import annotations

import argparse
import math

from .._errors import ConfigError
from ._dashboard import DEFAULT_BUSY, DEFAULT_REFRESH
from ._server import DEFAULT_PORT, serve_forever

MIN_REFRESH = 0.5  # the CLI's floor: every browser left open polls this often (the API allows less, for tests)


def register(sub: argparse._SubParsersAction) -> None:
    """The `graddoctor serve` sub-command."""
    p = sub.add_parser("serve", help="a live local dashboard of runs while they train (report views, findings)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories written by graddoctor.watch, or folders of them (searched 3 levels down, "
                        "again at every refresh); one that does not exist yet is waited for")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--refresh", type=float, default=DEFAULT_REFRESH,
                   help=f"seconds between the page's checks for new data (default {DEFAULT_REFRESH:g}; "
                        f"at least {MIN_REFRESH:g})")
    p.add_argument("--busy", type=float, default=DEFAULT_BUSY,
                   help=f"largest share of one core spent re-drawing plots "
                        f"(default {DEFAULT_BUSY:g}; 1: on every flush)")
    access = p.add_mutually_exclusive_group()
    access.add_argument("--token", default="auto",
                        help="ask every request for this token (default: none on a loopback --host, a random one, "
                             "printed in the address, on any other)")
    access.add_argument("--no-token", dest="token", action="store_const", const=None,
                        help="ask no token, even on a --host other machines can reach")
    p.add_argument("--certfile", metavar="PEM", help="serve HTTPS with this certificate (chain), PEM")
    p.add_argument("--keyfile", metavar="PEM", help="the certificate's private key, PEM (if not in --certfile)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    if not MIN_REFRESH <= args.refresh < math.inf:  # NaN too
        raise ConfigError(f"--refresh={args.refresh:g} is not allowed: "
                          f"--refresh must be a number of seconds >= {MIN_REFRESH:g}")
    serve_forever(args.run_dirs, args.host, args.port, args.refresh, args.busy, args.verbose, args.token,
                  args.certfile, args.keyfile)
    return 0
