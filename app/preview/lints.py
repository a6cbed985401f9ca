"""What a careful reviewer of a Braze template would flag, each with a stable code."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from app.preview.analysis import BRAZE_ROOTS, RECIPIENT_ROOTS, Analysis, CallSite, Segments, Use
from app.preview.braze import ATTRIBUTES
from app.preview.results import TemplateWarning

#: The lints, in the order they are reported; docs/templates.md ("Lints") describes each.
CODES = (
    "url-without-recipient",
    "id-not-escaped",
    "secret-in-url",
    "unhandled-failure",
    "control-group-ignored",
    "several-urls-one-user",
    "no-credential",
    "key-in-template",
    "insecure-url",
    "unknown-option",
    "cache-max-age-invalid",
    "undefined-variable",
    "unknown-filter",
)
_SECRET_PARAM = re.compile(
    r"[?&](?:api[_-]?key|apikey|key|token|access[_-]?token|auth|secret|client[_-]?secret|password|passwd|pwd|sig|"
    r"signature|credentials?)=",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"^[a-z]+://[^/@\s]+@", re.IGNORECASE)
_RANDOM_LOOKING = re.compile(r"[A-Za-z0-9]{20,}")
_AUTH_HEADERS = frozenset({"authorization", "x-api-key"})
MAX_CACHE_AGE_SECONDS = 14_400  # Braze caches a GET for at most 4 hours


def show(path: Segments) -> str:
    """A path as the template author wrote it (``${user_id}``, ``custom_attribute.${plan}``, ``recs.items``)."""
    if path[0] == ATTRIBUTES and len(path) > 1:
        return "${" + path[1] + "}" + "".join(f".{segment}" for segment in path[2:])
    if path[0] in RECIPIENT_ROOTS and len(path) > 1:
        return f"{path[0]}.${{{path[1]}}}" + "".join(f".{segment}" for segment in path[2:])
    return ".".join(path)


def _looks_like_a_key(token: str) -> bool:
    digits, letters = sum(c.isdigit() for c in token), sum(c.isalpha() for c in token)
    return digits >= 2 and letters >= 2


def _url_problems(call: CallSite) -> Iterator[TemplateWarning]:
    literal, line = call.literal_url, call.line
    if call.per_user and not any(use.path[0] in RECIPIENT_ROOTS for use in call.url_uses):
        yield TemplateWarning(
            line,
            "url-without-recipient",
            "this per-user URL is the same for every recipient: "
            "Braze caches per URL, so everyone would get the first recipient's data; "
            "put {{${user_id} | url_param_escape}} in the path",
        )
    for use in call.url_uses:
        if use.path[0] in RECIPIENT_ROOTS and "url_param_escape" not in use.filters:
            yield TemplateWarning(
                line,
                "id-not-escaped",
                f"{show(use.path)} goes into the URL without "
                "| url_param_escape: an id with '/', '?', '#' or a space breaks the URL",
            )
            break
    if (
        _USERINFO.search(literal)
        or _SECRET_PARAM.search(literal)
        or any(_looks_like_a_key(token) for token in _RANDOM_LOOKING.findall(literal))
    ):
        yield TemplateWarning(
            line,
            "secret-in-url",
            "the URL seems to carry a key or token: Braze logs rendered "
            "URLs; use a stored credential (:basic_auth NAME) instead",
        )
    if call.per_user and literal.lower().startswith("http://"):
        yield TemplateWarning(line, "insecure-url", "plain http: the caller key and the profile travel unencrypted")


def _option_problems(call: CallSite) -> Iterator[TemplateWarning]:
    spec, line = call.spec, call.line
    header_names = {name.lower() for name in spec.headers}
    if (
        call.per_user
        and not {"basic_auth", "auth_credentials"} & spec.options.keys()
        and not (header_names & _AUTH_HEADERS)
    ):
        yield TemplateWarning(
            line,
            "no-credential",
            "no credential: the service answers 401 and Braze renders "
            "nothing; add :basic_auth NAME (a Connected Content credential holding the key)",
        )
    if header_names & _AUTH_HEADERS:
        yield TemplateWarning(
            line,
            "key-in-template",
            "a key in :headers lives in the template (every editor and "
            "every copy sees it); store it as a credential and use :basic_auth NAME",
        )
    for name in spec.unknown:
        yield TemplateWarning(line, "unknown-option", f":{name} is not a Connected Content option")
    age = spec.options.get("cache_max_age")
    if "cache_max_age" in spec.options and not (age and age.isdigit() and int(age) <= MAX_CACHE_AGE_SECONDS):
        yield TemplateWarning(
            line,
            "cache-max-age-invalid",
            f":cache_max_age must be whole seconds up to {MAX_CACHE_AGE_SECONDS} (4 hours)",
        )


def _several_urls(found: Analysis) -> Iterator[TemplateWarning]:
    distinct: dict[str, CallSite] = {}
    for call in found.calls:
        if call.per_user:
            distinct.setdefault(re.sub(r"\s+", "", call.url_text), call)
    if len(distinct) > 1:
        first, *others = distinct.values()
        lines = ", ".join(str(call.line) for call in distinct.values())
        yield TemplateWarning(
            others[0].line,
            "several-urls-one-user",
            f"{len(distinct)} different URLs for the same "
            f"recipient (lines {lines}), each a Braze call: fetch the whole profile "
            "(/v1/users/{id}) once, :save it, and read every part from it",
        )


def _unhandled_failures(found: Analysis) -> Iterator[TemplateWarning]:
    if found.aborts:
        return
    for name, call in found.saves().items():
        if "default=" in call.url_text:
            continue
        uses = [use for use in found.uses if use.path[0] == name]
        if any("__http_status_code__" in use.path for use in uses):
            continue
        exposed = [use for use in uses if use.kind in ("output", "loop") and not use.handled and name not in use.guards]
        if exposed:
            yield TemplateWarning(
                exposed[0].line,
                "unhandled-failure",
                f"`{show(exposed[0].path)}` is rendered but "
                f"nothing handles a failed call (line {call.line}): add default= to the URL, "
                f"check {name}.__http_status_code__, or abort_message",
            )


def _ignored_control_groups(found: Analysis) -> Iterator[TemplateWarning]:
    saves = found.saves()
    checked = {use.path for use in found.uses}
    reported: set[Segments] = set()
    for use in found.uses:
        if use.kind not in ("output", "loop", "assign") or "items" not in use.path:
            continue
        prefix = use.path[: use.path.index("items")]
        call = saves.get(prefix[0]) if prefix else None
        applies = (call is not None and call.gives_recommendations and "rec_type=" not in call.url_text) or (
            "recommendations" in prefix
        )
        if applies and prefix not in reported and (*prefix, "is_control") not in checked:
            reported.add(prefix)
            yield TemplateWarning(
                use.line,
                "control-group-ignored",
                f"`{show(prefix)}.items` is rendered without "
                f"checking {show(prefix)}.is_control: control-group users must get the default "
                "experience or Amplitude cannot measure the recommendation's lift",
            )


def _unknown_names(found: Analysis) -> Iterator[TemplateWarning]:
    reported: set[str] = set()
    for use in found.uses:
        if use.root not in found.defined and use.root not in BRAZE_ROOTS and use.root not in reported:
            reported.add(use.root)
            yield TemplateWarning(
                use.line,
                "undefined-variable",
                f"`{use.root}` is never saved, assigned or provided by Braze: a typo? It renders as nothing",
            )


def _unknown_filters(found: Analysis, known: Callable[[str], bool]) -> Iterator[TemplateWarning]:
    for name, line in found.filters.items():
        if not known(name):
            yield TemplateWarning(
                line,
                "unknown-filter",
                f"`{name}` is not a Liquid or Braze filter this preview knows: it is skipped here",
            )


def lint(found: Analysis, known_filter: Callable[[str], bool]) -> list[TemplateWarning]:
    """Every warning for a template, ordered by line then by code."""
    warnings: list[TemplateWarning] = []
    for call in found.calls:
        warnings += [*_url_problems(call), *_option_problems(call)]
    warnings += [*_several_urls(found), *_unhandled_failures(found), *_ignored_control_groups(found)]
    warnings += [*_unknown_names(found), *_unknown_filters(found, known_filter)]
    return sorted(dict.fromkeys(warnings), key=lambda w: (w.line, CODES.index(w.code)))


__all__ = ["CODES", "Use", "lint", "show"]
