"""``python -m app preview TEMPLATE``: render a Braze message against the running service and lint it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.preview.calls import Credentials, Session
from app.preview.render import AttributesError, Previewer, Recipient
from app.preview.transport import HttpTransport, ServiceUnreachable
from app.warm import Fatal, service_settings

DEFAULT_URL = "http://127.0.0.1:8000"


def read_text(source: str, what: str) -> str:
    """The UTF-8 text of *source* (``-``: stdin), or :class:`Fatal` naming *what* could not be read."""
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        return raw.decode("utf-8-sig")
    except OSError as exc:
        raise Fatal(f"cannot read the {what} {source}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise Fatal(f"the {what} {source} is not UTF-8 (byte {exc.start})") from None


def _credential(entry: str, where: str) -> tuple[str, tuple[str, str]]:
    name, sep, secret = entry.partition("=")
    user, colon, password = secret.partition(":")
    if not sep or not colon or not name.strip() or not password:
        # Never echo the entry: it holds a password.
        raise Fatal(f"{where}: a credential is NAME=USER:PASSWORD")
    return name.strip(), (user, password)


def load_credentials(entries: list[str]) -> dict[str, tuple[str, str]]:
    """``--credential NAME=USER:PASSWORD`` entries, or ``@FILE`` holding one such line each."""
    named: dict[str, tuple[str, str]] = {}
    for entry in entries:
        if entry.startswith("@"):
            lines = read_text(entry[1:], "credential file").splitlines()
            for number, line in enumerate(lines, 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    name, value = _credential(line.strip(), f"{entry[1:]} line {number}")
                    named[name] = value
        else:
            name, value = _credential(entry, "--credential")
            named[name] = value
    return named


def load_recipient(user_id: str | None, attributes_file: str | None) -> Recipient:
    """The recipient from ``--user`` and ``--attributes``."""
    document: object = None
    if attributes_file:
        try:
            document = json.loads(read_text(attributes_file, "attributes file"))
        except ValueError as exc:
            raise Fatal(f"the attributes file {attributes_file} is not JSON: {exc}") from None
    try:
        return Recipient.from_document(user_id, document)
    except AttributesError as exc:
        raise Fatal(f"{attributes_file}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: "--key SECRET" must not pass for "--key-file SECRET".
    about = (
        "Render a Braze message template for one recipient (or dry-run it over many) with its Connected "
        "Content calls answered by the running service, and warn about template mistakes."
    )
    parser = argparse.ArgumentParser(prog="python -m app preview", description=about, allow_abbrev=False)
    parser.add_argument("template", help="the message template as pasted into Braze; '-' reads stdin")
    parser.add_argument("--user", help="the recipient's external id (${user_id})")
    parser.add_argument(
        "--attributes",
        metavar="FILE.json",
        help="standard attributes at the top level, custom ones under custom_attributes",
    )
    parser.add_argument(
        "--credential",
        action="append",
        default=[],
        metavar="NAME=USER:PASSWORD",
        help="a Braze credential for :basic_auth NAME (repeatable; @FILE reads one per line); "
        "without it the caller key is used",
    )
    parser.add_argument("--url", help=f"the service (default: $PROXY_URL or {DEFAULT_URL})")
    parser.add_argument("--key-file", help="file holding the caller key (default: $PROXY_API_KEY)")
    parser.add_argument("--key", help=argparse.SUPPRESS)  # only to refuse it without echoing the value
    parser.add_argument("--allow-external", action="store_true", help="also call hosts other than this service")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    dry_run = parser.add_argument_group("dry run (spends the upstream budget like live traffic)")
    dry_run.add_argument("--users", metavar="FILE", help="render for every id in FILE (one a line, or a CSV)")
    dry_run.add_argument("--column", help="CSV column holding the ids (the first row is then the header)")
    dry_run.add_argument("--sample", type=int, metavar="N", help="take N ids at random")
    dry_run.add_argument("--concurrency", type=int, default=4, help="recipients rendered at once (default 4)")
    dry_run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def print_preview(preview: Any, as_json: bool) -> None:
    """The rendered message on stdout, calls and warnings on stderr (or one JSON object on stdout)."""
    if as_json:
        print(json.dumps(preview.as_json(), ensure_ascii=False), flush=True)
        return
    for call in preview.calls:
        print(f"call {call}", file=sys.stderr)
    for warning in preview.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if preview.aborted is not None:
        print(f"aborted: {preview.aborted}", file=sys.stderr)
    if preview.rendered is not None:
        sys.stdout.write(preview.rendered if preview.rendered.endswith("\n") else preview.rendered + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run ``preview``; exit 0 clean, 1 with warnings, 2 usage/config/unparsable template, 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    transport: HttpTransport | None = None
    try:
        base, key = service_settings(args)
        credentials = Credentials(load_credentials(args.credential), key)
        previewer = Previewer(read_text(args.template, "template"))
        if args.users is None and (args.column or args.sample):
            raise Fatal("--column and --sample go with --users")
        transport = HttpTransport(base)
        if args.users is not None:
            from app.preview.dryrun import dry_run

            return dry_run(args, previewer, transport, credentials)
        recipient = load_recipient(args.user, args.attributes)
        session = Session(transport, credentials, allow_external=args.allow_external)
        preview = previewer.render(recipient, session)
        print_preview(preview, args.json)
        if previewer.syntax_error is not None:
            return 2
        return 1 if preview.warnings else 0
    except (Fatal, ServiceUnreachable) as exc:
        print(f"preview: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if transport is not None:
            transport.close()
