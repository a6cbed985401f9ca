"""The examples of README.md and docs/*.md, for the tests that run them as written.

A Liquid example is a ```liquid block. A curl example is a ``curl`` command line in a ```sh
or ```bash block; it answers 2xx unless its trailing comment starts with the status it
demonstrates (``curl ... /v1/users/unknown-1/cohorts   # 404 user_not_found``).

An example that needs what the test's demo service does not have (Amplitude's pushes, an
admin key, a file to send) says so in its trailing comment, ``# not run: WHY``; it is still
parsed (its options must be understood) but not run. It may give the status it shows
before the reason (``# 200, not run: needs the demo's pushes``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Where the examples live, README first.
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
#: The base URL the examples call: `make run`'s.
DEMO_URL = "http://localhost:8000"

_FENCE = re.compile(r"^```([A-Za-z]*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
_EXPECTED = re.compile(r"\s#\s*([1-5]\d\d)\b")
_NOT_RUN = re.compile(r"\s#.*?\bnot run:\s*(.+?)\s*$")


@dataclass(frozen=True)
class Example:
    """One fenced block: where it is, and its text."""

    page: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples(language: str | tuple[str, ...], pages: tuple[Path, ...] = PAGES, after: str = "") -> list[Example]:
    """The fenced blocks in *language* on *pages*, in page order (only those past the heading *after*)."""
    languages = (language,) if isinstance(language, str) else language
    found = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        start = text.index(after) if after else 0
        for match in _FENCE.finditer(text, start):
            if match.group(1) in languages:
                found.append(Example(page, text.count("\n", 0, match.start()) + 1, match.group(2)))
    return found


def liquid_examples() -> list[Example]:
    return examples("liquid")


@dataclass(frozen=True)
class CurlCall:
    """A curl command line, as the test replays it with requests."""

    example: Example
    line: int
    url: str
    auth: tuple[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    expected: int | None = None  # None: any 2xx
    method: str = "GET"
    data: str | None = None  # as given to -d (``@FILE`` names a file)
    not_run: str | None = None  # why the example cannot run against the test's demo service

    def __str__(self) -> str:
        return f"{self.example.page.relative_to(ROOT)}:{self.line}"


def parse_curl(example: Example, line: int, command: str) -> CurlCall:
    """One ``curl`` command line; an option this parser does not know is an error (keep examples simple)."""
    expected = _EXPECTED.search(command)
    not_run = _NOT_RUN.search(command)
    words = shlex.split(command, comments=True)
    url, auth, headers, method, data = None, None, {}, "GET", None
    position = 1
    while position < len(words):
        word = words[position]
        if word in ("-u", "--user"):
            user, _, password = words[position + 1].partition(":")
            auth = (user, password)
            position += 1
        elif word in ("-H", "--header"):
            name, _, value = words[position + 1].partition(":")
            headers[name.strip()] = value.strip()
            position += 1
        elif word in ("-X", "--request"):
            method = words[position + 1]
            position += 1
        elif word in ("-d", "--data", "--data-binary"):
            data = words[position + 1]
            method = "POST" if method == "GET" else method
            position += 1
        elif word in ("-i", "-s", "-S", "-sS", "-f", "--fail", "--include", "--silent"):
            pass
        elif word.startswith("http://") or word.startswith("https://"):
            url = word
        else:
            raise ValueError(f"{example} line {line}: curl option {word!r} is not understood by tests/doc_examples.py")
        position += 1
    if url is None:
        raise ValueError(f"{example} line {line}: curl without a URL")
    return CurlCall(
        example, line, url, auth, headers, int(expected.group(1)) if expected else None, method, data,
        not_run.group(1) if not_run else None,
    )  # fmt: skip


def curl_calls() -> list[CurlCall]:
    """Every curl command line of the ```sh and ```bash blocks."""
    calls = []
    for example in examples(("sh", "bash")):
        # Join continued lines, remembering where each command starts.
        lines = example.text.split("\n")
        number = 0
        while number < len(lines):
            start, command = number, lines[number]
            while command.endswith("\\") and number + 1 < len(lines):
                number += 1
                command = command[:-1] + " " + lines[number].strip()
            number += 1
            if command.strip().startswith("curl "):
                calls.append(parse_curl(example, example.line + 1 + start, command.strip()))
    return calls


def github_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings (outside code blocks)."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, number = slug, 0
        while anchor in anchors:
            number += 1
            anchor = f"{slug}-{number}"
        anchors.add(anchor)
    return anchors
