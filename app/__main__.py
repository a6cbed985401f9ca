"""``python -m app COMMAND``: the service's command-line tools (``warm``, ``preview``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand named in *argv*; return its exit code."""
    parser = argparse.ArgumentParser(prog="python -m app", description="Tools for the Amplitude profile service.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The subcommand parses its own options (and its own --help), so pass everything through.
    commands.add_parser("warm", add_help=False, help="warm the service's cache before a Braze send")
    commands.add_parser("preview", add_help=False, help="render a Braze template against the service and lint it")
    try:
        chosen, rest = parser.parse_known_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if chosen.command == "preview":
        from app.preview import cli

        return cli.main(rest)
    from app import warm  # imported here: `import app.__main__` stays cheap

    return warm.main(rest)


if __name__ == "__main__":
    sys.exit(main())
