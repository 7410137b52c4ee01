"""Command line: ``python -m tunneld check FILE`` validates a config without starting anything.

Exit status: 0 valid (prints ``OK: <summary>``, and any warnings about
unsafe settings on stderr, each ``warning: ...``), 1 invalid (the error on
stderr, one line), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from tunneld.config import ConfigError, describe, load_any_config


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tunneld", description="tunneld tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="validate a server or client config file")
    check.add_argument("file", metavar="FILE", help="a TOML file with [server] or [client] tables")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 after --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = load_any_config(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"OK: {describe(config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
