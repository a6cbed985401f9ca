"""Walk a parsed Braze template and note what the lints need: variable uses, calls, guards, aborts."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from liquid import BoundTemplate, Expression, RenderContext
from liquid.ast import Node
from liquid.builtin.expressions import FilteredExpression, Path
from liquid.builtin.output import OutputNode
from liquid.builtin.tags.assign_tag import AssignNode
from liquid.builtin.tags.capture_tag import CaptureNode
from liquid.builtin.tags.case_tag import CaseNode
from liquid.builtin.tags.for_tag import ForNode
from liquid.builtin.tags.if_tag import IfNode
from liquid.builtin.tags.unless_tag import UnlessNode

from app.preview.braze import ATTRIBUTES, AbortMessageNode, ConnectedContentNode, line_of
from app.preview.calls import CallSpec, parse_call

#: Objects whose values differ per recipient: a URL built from one of them is per-recipient.
RECIPIENT_ROOTS = frozenset(
    {ATTRIBUTES, "custom_attribute", "event_properties", "canvas_entry_properties", "context", "api_trigger_properties"}
)
#: Every object Braze itself puts in scope (and Liquid's loop helpers).
BRAZE_ROOTS = RECIPIENT_ROOTS | {
    "campaign",
    "canvas",
    "card",
    "content_blocks",
    "subscribed_state",
    "targeted_device",
    "most_recently_used_device",
    "dispatch_id",
    "connected",
    "forloop",
    "tablerowloop",
}
_LIQUID_IN_URL = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_WHOLE_PROFILE = re.compile(r"/v1/(?:users|devices)/[^/?#\s]+/?(?:[?#]|$)")

Segments = tuple[str, ...]


@dataclass(frozen=True)
class Use:
    """One variable reference: its path through aliases, where, how, and what protects it."""

    root: str  # as written (an alias name stays itself here)
    path: Segments  # resolved through ``assign``/``capture``/``for`` aliases
    line: int
    kind: str  # "output", "loop", "condition", "assign" or "other"
    filters: frozenset[str]
    guards: frozenset[str]  # resolved roots tested true by enclosing if/elsif/for
    handled: bool = False  # ``| default:`` on an output, an ``{% else %}`` on a loop


@dataclass
class CallSite:
    """A ``connected_content`` tag as written."""

    line: int
    url_text: str  # the URL with its Liquid left in
    spec: CallSpec  # options parsed from the markup as written
    url_uses: list[Use] = field(default_factory=list)

    @property
    def literal_url(self) -> str:
        """The URL with each piece of Liquid replaced by ``X``."""
        return _LIQUID_IN_URL.sub("X", self.url_text)

    @property
    def per_user(self) -> bool:
        return "/v1/users/" in self.literal_url or "/v1/devices/" in self.literal_url

    @property
    def gives_recommendations(self) -> bool:
        literal = self.literal_url
        return self.per_user and ("/recommendations" in literal or bool(_WHOLE_PROFILE.search(literal)))


@dataclass
class Analysis:
    """What :func:`analyze` found."""

    uses: list[Use] = field(default_factory=list)
    calls: list[CallSite] = field(default_factory=list)
    aborts: list[int] = field(default_factory=list)
    defined: set[str] = field(default_factory=set)
    filters: dict[str, int] = field(default_factory=dict)  # name -> first line

    def saves(self) -> dict[str, CallSite]:
        """Saved variable name -> the call that saves it."""
        return {call.spec.save: call for call in self.calls if call.spec.save}


def _segments(path: Path) -> Segments:
    return tuple("*" if isinstance(segment, Path) else str(segment) for segment in path.path)


def _paths(expression: Expression, filters: frozenset[str] = frozenset()) -> Iterator[tuple[Path, frozenset[str]]]:
    """Every variable path in *expression*, with the filters applied to it."""
    if isinstance(expression, FilteredExpression):
        names = frozenset(f.name for f in expression.filters or [])
        yield from _paths(expression.left, filters | names)
        for filter_ in expression.filters or []:
            for child in filter_.children():
                yield from _paths(child)
        return
    if isinstance(expression, Path):
        yield expression, filters
    for child in expression.children():
        yield from _paths(child)


class _Walker:
    def __init__(self, template: BoundTemplate) -> None:
        self.found = Analysis()
        self.aliases: dict[str, tuple[Segments, frozenset[str]]] = {}
        self.static_context = RenderContext(template)
        self.env = template.env

    def resolve(self, path: Segments) -> tuple[Segments, frozenset[str]]:
        filters: frozenset[str] = frozenset()
        for _ in range(8):  # an alias of an alias...; bounded against "assign a = a"
            if not path or path[0] not in self.aliases:
                break
            base, alias_filters = self.aliases[path[0]]
            path, filters = base + path[1:], filters | alias_filters
        return path, filters

    def record(
        self, expression: Expression, kind: str, guards: frozenset[str], handled: bool = False, line: int | None = None
    ) -> list[Use]:
        uses = []
        for path, filters in _paths(expression):
            segments = _segments(path)
            resolved, alias_filters = self.resolve(segments)
            all_filters = filters | alias_filters
            uses.append(
                Use(
                    segments[0],
                    resolved,
                    line or line_of(path.token),
                    kind,
                    all_filters,
                    guards,
                    handled or (kind == "output" and "default" in all_filters),
                )
            )
        self.found.uses.extend(uses)
        return uses

    def roots(self, expression: Expression) -> frozenset[str]:
        return frozenset(self.resolve(_segments(path))[0][0] for path, _ in _paths(expression))

    def visit(self, node: Node, guards: frozenset[str]) -> None:  # noqa: C901 - one branch per kind of node
        for name in (*node.template_scope(), *node.block_scope()):
            self.found.defined.add(str(name))
        for expression in node.expressions():
            for filter_ in getattr(expression, "filters", None) or []:
                self.found.filters.setdefault(filter_.name, line_of(filter_.token))
        if isinstance(node, IfNode | UnlessNode):
            tested = self.roots(node.condition)
            self.record(node.condition, "condition", guards)
            self.visit(node.consequence, guards | tested if isinstance(node, IfNode) else guards)
            for branch in node.alternatives:
                self.record(branch.expression, "condition", guards)
                self.visit(branch.block, guards | self.roots(branch.expression))
            if node.default is not None:
                self.visit(node.default, guards | tested if isinstance(node, UnlessNode) else guards)
        elif isinstance(node, ForNode):
            loop = node.expression
            uses = self.record(loop.iterable, "loop", guards, handled=node.default is not None)
            if uses:
                self.aliases[str(loop.identifier)] = (uses[0].path + ("*",), uses[0].filters)
            self.visit(node.block, guards | self.roots(loop.iterable))
            if node.default is not None:
                self.visit(node.default, guards)
        elif isinstance(node, CaseNode):
            self.record(node.expression, "condition", guards)
            for child in node.children(self.static_context):
                self.visit(child, guards | self.roots(node.expression))
        elif isinstance(node, AssignNode):
            uses = self.record(node.expression, "assign", guards)
            left = node.expression.left if isinstance(node.expression, FilteredExpression) else None
            if isinstance(left, Path) and uses:
                self.aliases[str(node.name)] = (uses[0].path, uses[0].filters)
        elif isinstance(node, CaptureNode):
            before = len(self.found.uses)
            self.visit(node.block, guards)
            captured = [use for use in self.found.uses[before:] if use.kind == "output"]
            recipient = [use for use in captured if use.path[0] in RECIPIENT_ROOTS] or captured
            if recipient:
                self.aliases[str(node.name)] = (recipient[0].path, recipient[0].filters)
        elif isinstance(node, ConnectedContentNode):
            self.connected_content(node, guards)
        elif isinstance(node, AbortMessageNode):
            self.found.aborts.append(line_of(node.token))
        elif isinstance(node, OutputNode):
            self.record(node.expression, "output", guards)
        else:
            for expression in node.expressions():
                self.record(expression, "other", guards)
            for child in node.children(self.static_context):
                self.visit(child, guards)

    def connected_content(self, node: ConnectedContentNode, guards: frozenset[str]) -> None:
        line = line_of(node.token)
        markup = node.markup.strip()
        # The URL ends at the first whitespace outside Liquid markup.
        url_end = next(
            (m.start() for m in re.finditer(r"\s", _LIQUID_IN_URL.sub(lambda m: "X" * len(m[0]), markup))), len(markup)
        )
        site = CallSite(line, markup[:url_end], parse_call(markup))
        for child in node.template.nodes:
            for filter_ in getattr(getattr(child, "expression", None), "filters", None) or []:
                self.found.filters.setdefault(filter_.name, line)
            if isinstance(child, OutputNode) and child.token.start_index < url_end:
                site.url_uses.extend(self.record(child.expression, "url", guards, line=line))
            elif not isinstance(child, OutputNode):
                self.visit(child, guards)
        if site.spec.save:
            self.found.defined.add(site.spec.save)
        else:
            self.found.defined.add("connected")
        self.found.calls.append(site)


def analyze(template: BoundTemplate) -> Analysis:
    """Walk *template* (parsed by a :class:`BrazeEnvironment`) once."""
    walker = _Walker(template)
    for node in template.nodes:
        walker.visit(node, frozenset())
    return walker.found
