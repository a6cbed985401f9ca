"""Braze's Liquid on top of python-liquid: ``${attribute}`` syntax, its tags and its filters."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from liquid import Environment
from liquid.ast import Node
from liquid.exceptions import LiquidSyntaxError
from liquid.filter import string_filter
from liquid.tag import Tag
from liquid.token import TOKEN_EXPRESSION, TOKEN_TAG, Token

if TYPE_CHECKING:
    from liquid import BoundTemplate, RenderContext
    from liquid.stream import TokenStream

#: Where a render keeps its Connected Content session (``RenderContext.tag_namespace``).
SESSION_KEY = "braze_session"
#: The name ``${attribute}`` becomes: Braze's standard attributes live under it.
ATTRIBUTES = "__braze__"

_MARKUP_START = re.compile(r"\{\{|\{%")
_ATTRIBUTE = re.compile(r"(\.)?\$\{([^{}\n]*)\}")
_TAG_NAME = re.compile(r"\{%-?\s*(\w+)")
_ABORT = re.compile(r"""^\(\s*(?:'([^']*)'|"([^"]*)")?\s*\)$|^$""")


class AbortMessage(Exception):
    """``{% abort_message('reason') %}``: Braze does not send this message to this recipient."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectedContentSession(Protocol):
    """What a render needs to carry out ``{% connected_content %}`` (see :mod:`app.preview.calls`)."""

    def connected_content(self, markup: str, line: int) -> tuple[str | None, object, str]:
        """Make (or reuse) the call *markup* describes: (``:save`` name or None, saved value, inserted text)."""
        ...


def line_of(token: Token) -> int:
    """The 1-based line of *token* in its template."""
    return token.source.count("\n", 0, max(token.start_index, 0)) + 1


def _attribute_path(match: re.Match[str]) -> str:
    name = match.group(2).strip()
    quoted = json.dumps(name) if '"' not in name else "'" + name.replace("'", "") + "'"
    return f"[{quoted}]" if match.group(1) else f"{ATTRIBUTES}[{quoted}]"


def translate(source: str) -> str:
    """Rewrite Braze-only syntax inside Liquid markup into plain Liquid, keeping every line where it was.

    ``{{${first_name}}}`` becomes ``{{__braze__["first_name"]}}`` and ``custom_attribute.${Plan}``
    becomes ``custom_attribute["Plan"]``. Inside a tag other than ``connected_content`` (whose markup
    is itself a template), Braze also accepts ``{{ ... }}`` around a value: the braces are dropped.
    """
    out: list[str] = []
    pos = 0
    while (start := _MARKUP_START.search(source, pos)) is not None:
        out.append(source[pos : start.start()])
        is_tag = start.group() == "{%"
        name = _TAG_NAME.match(source, start.start())
        strip_braces = is_tag and (name is None or name.group(1) != "connected_content")
        end, i = ("%}" if is_tag else "}}"), start.end()
        out.append(start.group())
        while i < len(source):
            attribute = _ATTRIBUTE.match(source, i) if source[i] in ".$" else None
            if attribute is not None:
                out.append(_attribute_path(attribute))
                i = attribute.end()
            elif source.startswith(end, i):
                out.append(end)
                i += 2
                break
            elif strip_braces and source.startswith(("{{", "}}"), i):
                out.append("  ")
                i += 2
            else:
                out.append(source[i])
                i += 1
        pos = i
    out.append(source[pos:])
    return "".join(out)


# --- Filters Braze adds to Shopify's -------------------------------------------------------------


@string_filter
def url_param_escape(value: str) -> str:
    """Percent-encode everything but unreserved characters, for a path segment or a query value."""
    return quote(value, safe="-_.~")


@string_filter
def url_escape(value: str) -> str:
    """Percent-encode characters that may not appear in a URL, leaving its structure alone."""
    return quote(value, safe=":/?#[]@!$&'()*+,;=%-_.~")


@string_filter
def json_escape(value: str) -> str:
    """Escape *value* for use inside a JSON string literal."""
    return json.dumps(value)[1:-1]


def as_json_string(value: object) -> str:
    """Render *value* as JSON text (a Connected Content object saved in a Canvas Context step)."""
    return value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))


def property_accessor(value: object, key: object) -> object:
    """``{{ hash | property_accessor: key }}``: look *key* up in *value*."""
    return value.get(str(key)) if isinstance(value, dict) else None


def number_with_delimiter(value: object) -> str:
    """``1234567`` as ``1,234,567``."""
    try:
        number = float(str(value))
    except ValueError:
        return str(value)
    return f"{int(number):,}" if number.is_integer() else f"{number:,}"


def time_zone(value: object, zone: object) -> object:
    """Convert a date (or ``'now'``) to the time zone named *zone*, for the ``date`` filter."""
    try:
        tz = ZoneInfo(str(zone))
    except (ZoneInfoNotFoundError, ValueError):
        return value
    if value in ("now", "today"):
        return dt.datetime.now(tz)
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.isdigit()):
        return dt.datetime.fromtimestamp(float(value), tz)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).astimezone(tz)
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(tz)
    return value


def _digest(algorithm: str) -> Callable[[object], str]:
    @string_filter
    def digest(value: str) -> str:
        return hashlib.new(algorithm, value.encode()).hexdigest()

    return digest


@string_filter
def base64_encode(value: str) -> str:
    """Base64 of the UTF-8 text."""
    return base64.b64encode(value.encode()).decode("ascii")


BRAZE_FILTERS: dict[str, Callable[..., Any]] = {
    "url_param_escape": url_param_escape,
    "url_escape": url_escape,
    "json_escape": json_escape,
    "as_json_string": as_json_string,
    "property_accessor": property_accessor,
    "number_with_delimiter": number_with_delimiter,
    "time_zone": time_zone,
    "md5": _digest("md5"),
    "sha1": _digest("sha1"),
    "sha2": _digest("sha256"),
    "base64_encode": base64_encode,
}


# --- Tags ----------------------------------------------------------------------------------------


def _markup(stream: TokenStream, tag: str) -> tuple[Token, str]:
    """The tag token and its raw markup, leaving the stream on the tag's last token (the parser's rule)."""
    token = stream.expect(TOKEN_TAG)
    if stream.peek.kind != TOKEN_EXPRESSION:
        if tag == "abort_message":
            return token, ""
        raise LiquidSyntaxError(f"{tag} needs a URL", token=token)
    next(stream)
    return token, stream.current.value


class ConnectedContentNode(Node):
    """``{% connected_content URL :option ... %}``: the URL and options are rendered as Liquid first."""

    __slots__ = ("markup", "template")

    def __init__(self, token: Token, markup: str, template: BoundTemplate) -> None:
        super().__init__(token)
        self.markup = markup
        self.template = template
        self.blank = ":save" in markup

    def __str__(self) -> str:
        return f"{{% connected_content {self.markup} %}}"

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        session: ConnectedContentSession = context.tag_namespace[SESSION_KEY]
        rendered = io.StringIO()
        self.template.render_with_context(context, rendered)
        save, value, inserted = session.connected_content(rendered.getvalue(), line_of(self.token))
        if save is not None:
            context.assign(save, value)
        elif value is not None:
            context.assign("connected", value)  # Braze's name for an unsaved JSON answer
        return buffer.write(inserted)

    def children(self, static_context: RenderContext, *, include_partials: bool = True) -> Iterator[Node]:
        yield from self.template.nodes


class ConnectedContentTag(Tag):
    """Parse ``connected_content``; its markup is kept as a template of its own."""

    name = "connected_content"
    block = False

    def parse(self, stream: TokenStream) -> Node:
        token, markup = _markup(stream, self.name)
        return ConnectedContentNode(token, markup, self.env.from_string(markup))


class AbortMessageNode(Node):
    """``{% abort_message('reason') %}``."""

    __slots__ = ("reason",)

    def __init__(self, token: Token, reason: str) -> None:
        super().__init__(token)
        self.reason = reason

    def __str__(self) -> str:
        return f"{{% abort_message({self.reason!r}) %}}"

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        raise AbortMessage(self.reason)


class AbortMessageTag(Tag):
    """Parse ``abort_message('reason')`` (the reason is optional)."""

    name = "abort_message"
    block = False

    def parse(self, stream: TokenStream) -> Node:
        token, markup = _markup(stream, self.name)
        match = _ABORT.match(markup.strip())
        if match is None:
            raise LiquidSyntaxError("abort_message takes one quoted reason: abort_message('why')", token=token)
        return AbortMessageNode(token, match.group(1) or match.group(2) or "")


class BrazeEnvironment(Environment):
    """Shopify Liquid plus Braze's syntax, tags and filters, with bounds for untrusted templates."""

    loop_iteration_limit = 100_000
    output_stream_limit = 2_000_000
    local_namespace_limit = 4_000_000

    def __init__(self) -> None:
        # Unknown filters render as if absent (Braze has more than this preview knows); a lint names them.
        super().__init__(strict_filters=False)
        for tag in (ConnectedContentTag, AbortMessageTag):
            self.add_tag(tag)
        for name, function in BRAZE_FILTERS.items():
            self.add_filter(name, function)

    def tokenizer(self) -> Callable[[str], Iterator[Token]]:
        tokenize = super().tokenizer()
        return lambda source: tokenize(translate(source))
