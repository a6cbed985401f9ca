"""Render one Braze message for one recipient: parse once, lint once, render per recipient."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from liquid import RenderContext
from liquid.exceptions import LiquidError

from app.preview.analysis import RECIPIENT_ROOTS, analyze
from app.preview.braze import ATTRIBUTES, SESSION_KEY, AbortMessage, BrazeEnvironment, line_of
from app.preview.calls import Session
from app.preview.lints import lint
from app.preview.results import Preview, TemplateWarning

#: Top-level keys of an attributes file that are Braze objects rather than standard attributes.
OBJECTS = ("custom_attributes", *sorted(RECIPIENT_ROOTS - {ATTRIBUTES, "custom_attribute"}))


class AttributesError(ValueError):
    """An attributes document that is not what ``--attributes`` expects."""


@dataclass
class Recipient:
    """Who the message is for: ``${user_id}``, other standard attributes, custom attributes, Canvas context."""

    user_id: str | None
    attributes: dict[str, Any] = field(default_factory=dict)
    custom_attributes: dict[str, Any] = field(default_factory=dict)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # context, event_properties, ...

    @classmethod
    def from_document(cls, user_id: str | None, document: object) -> Recipient:
        """Build from a parsed attributes JSON document (standard attributes at the top level)."""
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise AttributesError("the attributes must be a JSON object")
        standard = {key: value for key, value in document.items() if key not in OBJECTS}
        objects = {key: document[key] for key in OBJECTS if key in document}
        for key, value in objects.items():
            if not isinstance(value, dict):
                raise AttributesError(f"{key} must be a JSON object")
        custom = objects.pop("custom_attributes", {})
        user = user_id if user_id is not None else standard.get("user_id", standard.get("external_id"))
        return cls(None if user is None else str(user), standard, custom, objects)

    def globals(self) -> dict[str, Any]:
        """The render context Braze would give this recipient."""
        attributes = {**self.attributes, "user_id": self.user_id}
        return {ATTRIBUTES: attributes, "custom_attribute": self.custom_attributes, **self.objects}


class Previewer:
    """A template parsed and linted once, rendered for as many recipients as needed."""

    def __init__(self, source: str, environment: BrazeEnvironment | None = None) -> None:
        self.environment = environment or BrazeEnvironment()
        self.source = source
        self.syntax_error: TemplateWarning | None = None
        try:
            self.template = self.environment.from_string(source)
        except LiquidError as exc:
            self.syntax_error = _problem(exc, "syntax-error", source)
            self.lints: list[TemplateWarning] = []
            self.control_paths: set[tuple[str, ...]] = set()
            return
        found = analyze(self.template)
        self.lints = lint(found, self.environment.filters.__contains__)
        # The control-group flags this template reads: a recipient "is in the control group" when one is true.
        self.control_paths = {use.path for use in found.uses if use.path[-1] == "is_control"}

    def render(self, recipient: Recipient, session: Session) -> Preview:
        """Render for *recipient*, making its Connected Content calls through *session*."""
        preview = Preview(user_id=recipient.user_id)
        if self.syntax_error is not None:
            preview.warnings = [self.syntax_error]
            return preview
        context = RenderContext(self.template, globals=self.template.make_globals(recipient.globals()))
        context.tag_namespace[SESSION_KEY] = session
        buffer = io.StringIO()
        try:
            self.template.render_with_context(context, buffer)
            preview.rendered = buffer.getvalue()
        except AbortMessage as abort:
            preview.aborted = abort.reason or "aborted"
        except LiquidError as exc:
            session.warnings.append(_problem(exc, "render-error", self.source))
        preview.calls = session.calls
        preview.control = any(_lookup(context.locals, path) is True for path in self.control_paths) or (
            not self.control_paths and any(call.control for call in session.calls)
        )
        preview.warnings = sorted(dict.fromkeys([*self.lints, *session.warnings]), key=lambda w: w.line)
        return preview


def _problem(exc: LiquidError, code: str, source: str) -> TemplateWarning:
    """A Liquid error as a warning; one found at the end of the template (an unclosed block) is on its last line."""
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    token = exc.token
    line = line_of(token) if token is not None and token.start_index >= 0 else source.count("\n") + 1
    return TemplateWarning(line, code, message)


def _lookup(scope: Any, path: tuple[str, ...]) -> object:
    """The value at *path* in *scope*; ``*`` matches any item (the first true one wins)."""
    for position, segment in enumerate(path):
        if segment == "*":
            items = scope.values() if isinstance(scope, dict) else scope if isinstance(scope, list) else []
            found = [_lookup(item, path[position + 1 :]) for item in items]
            return True if True in found else None
        scope = scope.get(segment) if hasattr(scope, "get") else None
    return scope
