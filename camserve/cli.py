"""The ``camserve`` command: export, serve, explain, evaluate.

Subcommands import their component only when run, so ``camserve explain`` needs just the
thin client and ``camserve serve`` never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys

import camserve
from camserve.errors import CamserveError


def build_parser() -> argparse.ArgumentParser:
    from camserve.client import cli as client_cli
    from camserve.export import cli as export_cli
    from camserve.server import cli as server_cli
    from camserve.server.cluster import cli as cluster_cli
    from camserve.server.evaluate import cli as evaluate_cli

    parser = argparse.ArgumentParser(prog="camserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version",
                        version=f"camserve {camserve.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    export_cli.add_parser(subparsers)
    server_cli.add_parser(subparsers)
    cluster_cli.add_parser(subparsers)
    client_cli.add_parser(subparsers)
    evaluate_cli.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else list(argv))[:1] == ["explain"]:
        # gRPC's native log lines would print beside the one-line error (read when grpc is
        # first imported); GRPC_VERBOSITY=ERROR or DEBUG in the environment shows them
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CamserveError as exc:
        print(f"camserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
