"""Write docs/configuration.md and .env.example from the code: ``make docs``.

Each setting of ``app.settings.SettingsSchema`` gives its name, its default (the field's
``load_default``) and its description (the field's ``metadata={"description": ...}``), so a
default is written once, in the schema. Beside them, the variables ``gunicorn.conf.py`` reads
and those the front reads (``deploy/nginx/render.py``, ``scripts/run-prod.sh``) take their
defaults from those files; their descriptions are the tables below. A variable one of those
files reads without a description here, or a description here for a variable nobody reads,
stops the generator with a message naming it.

``tests/test_docs.py`` renders both files in memory and fails when the committed ones differ,
so changing a setting without running ``make docs`` fails ``make test``.
``python scripts/gen_docs.py --check`` does the same comparison from the command line.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the project's own modules come from the checkout
    sys.path.insert(0, str(ROOT))

from marshmallow.utils import missing  # noqa: E402

from app.settings import SettingsSchema  # noqa: E402

CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / ".env.example"
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
FRONT_RENDER = ROOT / "deploy" / "nginx" / "render.py"
RUN_PROD = ROOT / "scripts" / "run-prod.sh"


class DocsError(Exception):
    """The code and this generator's tables disagree; the message names the variables."""


@dataclass(frozen=True)
class Extra:
    """A variable read outside the settings schema: its description, and its default in words
    when the file that reads it computes the default rather than writing it down."""

    description: str
    default_text: str | None = None


#: What gunicorn.conf.py reads besides the settings (their defaults are read from the file).
GUNICORN_VARIABLES = {
    "HOST": Extra("The address gunicorn listens on (with `PORT`)."),
    "WEB_CONCURRENCY": Extra(
        "Worker processes. The cores counted are those this process may use: its CPU affinity (`taskset`, a "
        "container's cpuset), capped by a cgroup CPU limit (`docker run --cpus`, a Kubernetes CPU limit) rounded "
        "up. A CPU *request* alone limits nothing, so set `WEB_CONCURRENCY` where a container has only a request.",
        default_text="one per core",
    ),
    "GUNICORN_WORKER_CLASS": Extra(
        "gunicorn's worker class. `gevent`, the stock gevent worker, serves each connection in a greenlet of its "
        "own (see [Why gevent](architecture.md#why-gevent)). `gthread` runs the threaded worker instead, for the "
        "benchmark's comparison; the image does not ship it."
    ),
    "GUNICORN_WORKER_CONNECTIONS": Extra(
        "Under gevent, the connections (and so the requests) one worker holds at once."
    ),
    "GUNICORN_THREADS": Extra("Threads per worker, under `GUNICORN_WORKER_CLASS=gthread` only."),
    "PROMETHEUS_MULTIPROC_DIR": Extra(
        "Where every worker writes its metrics for `/metrics` to add up; emptied at start, removed at exit.",
        default_text="a new directory in the system's temporary directory, per gunicorn master",
    ),
}

#: What the front reads: deploy/nginx/render.py (the front image, make run-prod, the tests) and
#: scripts/run-prod.sh. docker compose reads some of them from .env too.
FRONT_VARIABLES = {
    "FRONT_HOST": Extra("`make run-prod`: the address the front listens on."),
    "FRONT_PORT": Extra("`make run-prod`: the front's port. docker compose: the port it publishes."),
    "FRONT_TLS_PORT": Extra(
        "`make run-prod` with a certificate: the front's TLS port. docker compose: the TLS port it publishes."
    ),
    "BACKEND_PORT": Extra("`make run-prod`: gunicorn's port on 127.0.0.1, behind the front."),
    "FRONT_LISTEN": Extra(
        "The front image: `HOST:PORT` for plain HTTP (`make run-prod` listens on `FRONT_HOST:FRONT_PORT` instead)."
    ),
    "FRONT_UPSTREAM": Extra("gunicorn's `HOST:PORT` (docker compose sets `proxy:8001`)."),
    "FRONT_TLS_LISTEN": Extra("`HOST:PORT` for TLS, when a certificate is given (without it, port 8443)."),
    "FRONT_TLS_CERT": Extra("A PEM certificate chain: with `FRONT_TLS_KEY`, the front serves TLS as well."),
    "FRONT_TLS_KEY": Extra("The PEM private key of `FRONT_TLS_CERT`."),
    "FRONT_REAL_IP_FROM": Extra(
        "Load balancers in front of the front (networks or addresses, never `*`) whose `X-Forwarded-For` it believes."
    ),
    "FRONT_HEADER_TIMEOUT": Extra(
        "Seconds a client may take over its request headers; then the front closes the connection without an answer."
    ),
    "FRONT_BODY_TIMEOUT": Extra(
        "Seconds a client may pause while sending a request body; then the front closes the connection without an "
        "answer."
    ),
    "FRONT_UPSTREAM_TIMEOUT": Extra(
        "Seconds the front waits on gunicorn to take a request or to answer; then it answers 504 `gateway_timeout`."
    ),
    "FRONT_WORKER_PROCESSES": Extra("nginx worker processes (`auto`: one per core)."),
    "FRONT_WORKER_CONNECTIONS": Extra("Connections each nginx worker holds at once."),
    "FRONT_ACCESS_LOG": Extra("Where the front writes one JSON line for each answer it gives itself."),
    "FRONT_ERROR_LOG": Extra("nginx's error log."),
}


@dataclass(frozen=True)
class Group:
    title: str
    intro: str
    names: tuple[str, ...]


#: The order of the pages. A setting in no group lands in "Other settings"; a name here that
#: nothing reads is left out.
GROUPS = (
    Group(
        "Amplitude", "", ("AMPLITUDE_SECRET_KEY", "AMPLITUDE_REGION", "AMPLITUDE_API_URL", "ALLOW_INSECURE_UPSTREAM")
    ),
    Group(
        "Callers",
        "Who may call, and how their keys are checked. See [Security](operations.md#security).",
        (
            "PROXY_API_KEYS",
            "ADMIN_API_KEYS",
            "ALLOW_OPEN_ACCESS",
            "ALLOWED_CIDRS",
            "TRUSTED_PROXY_COUNT",
            "FORWARDED_ALLOW_IPS",
            "AUTH_FAILURE_LIMIT_PER_MINUTE",
            "CALLER_MISS_LIMIT_PER_MINUTE",
            "BULK_CALLERS",
        ),
    ),
    Group(
        "What a profile holds",
        "With `PROFILE_REC_IDS` and `PROFILE_PREDICTION_IDS` set, one Amplitude call fetches everything every "
        "route needs for a user (see [How a lookup is answered](api.md#how-a-lookup-is-answered)).",
        ("PROFILE_REC_IDS", "PROFILE_PREDICTION_IDS", "PROFILE_PROPENSITY_TYPE", "RECOMMENDATIONS_FETCH"),
    ),
    Group(
        "Cache",
        "",
        (
            "CACHE_TTL_SECONDS",
            "STALE_WHILE_REVALIDATE_SECONDS",
            "STALE_IF_ERROR_SECONDS",
            "NEGATIVE_CACHE_TTL_SECONDS",
            "CACHE_MAX_ENTRIES",
        ),
    ),
    Group(
        "Upstream budget and failures",
        "See [Sending to many users](templates.md#sending-to-many-users) for how the budget is spent.",
        (
            "UPSTREAM_RATE_LIMIT_PER_MINUTE",
            "UPSTREAM_BUDGET_SHARES",
            "BUDGET_MAX_WAIT_SECONDS",
            "UPSTREAM_429_BACKOFF_SECONDS",
            "UPSTREAM_CONNECT_TIMEOUT",
            "UPSTREAM_READ_TIMEOUT",
            "UPSTREAM_MAX_BODY_BYTES",
            "UPSTREAM_CONCURRENCY",
            "REQUEST_DEADLINE_SECONDS",
            "BREAKER_FAILURE_THRESHOLD",
            "BREAKER_COOLDOWN_SECONDS",
        ),
    ),
    Group(
        "Shared tier",
        "How the processes and instances share cache, budget, back-off and single-flight. See [Running several "
        "processes and instances](operations.md#running-several-processes-and-instances).",
        ("REDIS_URL", "REDIS_SENTINELS", "REDIS_SENTINEL_SERVICE", "REDIS_TIMEOUT_SECONDS", "SHARED_STATE_PATH"),
    ),
    Group(
        "Cohort webhooks",
        "",
        (
            "COHORT_WEBHOOK_SECRETS",
            "COHORT_SETTLE_SECONDS",
            "COHORT_REALTIME_IDS",
            "COHORT_REALTIME_MAX_SILENCE_SECONDS",
        ),
    ),
    Group(
        "Logs, warnings and tools",
        "See [Operating it](operations.md#operating-it).",
        (
            "LOG_LEVEL",
            "ACCESS_LOG",
            "LOG_USER_IDS",
            "BRAZE_FAILURE_WARN_SHARE",
            "BRAZE_FAILURE_WARN_MIN",
            "PREVIEW_PAGE",
            "DEMO_MODE",
        ),
    ),
    Group(
        "Server (gunicorn)",
        "`gunicorn -c gunicorn.conf.py`, run from the repository root, starts the service from these variables and "
        "the ones above (the Dockerfile runs the same). `PORT` is a setting of the service; the others are read by "
        "`gunicorn.conf.py` alone.",
        (
            "PORT",
            "HOST",
            "WEB_CONCURRENCY",
            "GUNICORN_WORKER_CLASS",
            "GUNICORN_WORKER_CONNECTIONS",
            "GUNICORN_THREADS",
            "PROMETHEUS_MULTIPROC_DIR",
        ),
    ),
    Group(
        "The front (nginx)",
        "Read by `make run-prod` (`scripts/run-prod.sh`) and by the front's renderer (`deploy/nginx/render.py`, run "
        "by the front image); docker compose reads `FRONT_PORT`, `FRONT_TLS_PORT`, `FRONT_TLS_CERT`, `FRONT_TLS_KEY` "
        "and `FRONT_REAL_IP_FROM` from `.env`. The service itself reads none of them. See "
        "[Deploy](operations.md#deploy).",
        tuple(FRONT_VARIABLES),
    ),
)
OTHER = "Other settings"

#: Values .env.example shows where a variable has no default worth showing; the first two are
#: left uncommented, as every deployment sets them.
ENV_EXAMPLES = {
    "AMPLITUDE_SECRET_KEY": "replace-with-your-amplitude-secret-key",
    "PROXY_API_KEYS": "braze:replace-with-a-long-random-key",
    "ADMIN_API_KEYS": "ops:replace-with-another-long-random-key",
    "ALLOWED_CIDRS": "braze:US-01,203.0.113.0/24",
    "BULK_CALLERS": "warm",
    "PROFILE_REC_IDS": "rec_home,rec_email",
    "PROFILE_PREDICTION_IDS": "pred_churn",
    "REDIS_URL": "redis://redis:6379/0",
    "REDIS_SENTINELS": "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379",
    "REDIS_SENTINEL_SERVICE": "mymaster",
    "SHARED_STATE_PATH": "/var/lib/amplitude-proxy/shared.sqlite3",
    "CALLER_MISS_LIMIT_PER_MINUTE": "60",
}
ENV_SET = ("AMPLITUDE_SECRET_KEY", "PROXY_API_KEYS")


@dataclass(frozen=True)
class Variable:
    """One environment variable as the pages show it."""

    name: str
    default: str | None  # as written in the environment; None: no default
    default_text: str | None  # the default in words, when it is computed
    required: bool
    description: str


# -- reading the code -------------------------------------------------------------------------


def env_value(value: object) -> str | None:
    """A default as one would write it in the environment (``None``: there is none)."""
    if value is None or value is missing:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value) or None
    return str(value) or None


def declared_in(name: str) -> str:
    """The file that declares the settings field *name* (``SettingsSchema`` may inherit fields)."""
    for cls in reversed(SettingsSchema.__mro__):
        if name in getattr(cls, "_declared_fields", {}):
            module = sys.modules[cls.__module__]
            return str(Path(module.__file__ or cls.__module__).resolve().relative_to(ROOT))
    return "app/settings.py"


def schema_variables() -> dict[str, Variable]:
    """Every setting of ``SettingsSchema``.

    :raises DocsError: naming every field without a description, and the file that declares it.
    """
    variables = {}
    undescribed = []
    for name, field in SettingsSchema().fields.items():
        description = (field.metadata or {}).get("description", "").strip()
        if not description:
            undescribed.append(f"{name} ({declared_in(name)})")
            continue
        variables[name] = Variable(name, env_value(field.load_default), None, field.required, description)
    if undescribed:
        raise DocsError(
            'settings without a description: add metadata={"description": ...} to the field of '
            + ", ".join(sorted(undescribed))
        )
    return variables


def _is_environ_read(call: ast.Call) -> bool:
    func = call.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr in ("get", "setdefault")
        and isinstance(func.value, ast.Attribute)
        and func.value.attr == "environ"
        and isinstance(func.value.value, ast.Name)
        and func.value.value.id == "os"
    )


def _constant(node: ast.AST | None) -> object:
    return node.value if isinstance(node, ast.Constant) else missing


def python_reads(path: Path, is_read: Callable[[ast.Call], bool] = _is_environ_read) -> dict[str, object]:
    """The variables *path* reads by name, each with its default where the file writes it as a
    constant (``missing`` where it computes it): ``os.environ.get("X", "d")``,
    ``os.environ.get("X") or d``, ``os.environ.setdefault("X", "d")``, or calls *is_read* accepts."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    or_defaults: dict[int, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and isinstance(node.values[0], ast.Call):
            or_defaults[id(node.values[0])] = _constant(node.values[1])
    reads: dict[str, object] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and is_read(node) and node.args):
            continue
        name = _constant(node.args[0])
        if not isinstance(name, str):
            continue  # a name held in a variable: internal to the file
        default = _constant(node.args[1]) if len(node.args) > 1 else None
        if default is None and id(node) in or_defaults:
            default = or_defaults[id(node)]
        if reads.get(name) in (None, missing):
            reads[name] = default
    return reads


def _is_render_env(call: ast.Call) -> bool:
    return isinstance(call.func, ast.Name) and call.func.id == "_env"


def shell_reads(path: Path, pattern: str) -> dict[str, object]:
    """``${NAME:-default}`` in a shell script, for names matching *pattern*."""
    reads: dict[str, object] = {}
    for name, default in re.findall(r"\$\{(" + pattern + r"):-([^}$]*)\}", path.read_text(encoding="utf-8")):
        reads.setdefault(name, default or None)
    return reads


def extra_variables(
    table: dict[str, Extra], reads: dict[str, object], source: str, settings: Iterable[str]
) -> dict[str, Variable]:
    """The variables of *table*, with the defaults *reads* found in *source*.

    :raises DocsError: a variable read without a description, described but never read, or
        with a computed default and no words for it.
    """
    unread = [name for name in table if name not in reads]
    undescribed = [name for name in reads if name not in table and name not in settings]
    problems = []
    if undescribed:
        problems.append(f"{source} reads {', '.join(sorted(undescribed))}: describe it in scripts/gen_docs.py")
    if unread:
        problems.append(f"{source} no longer reads {', '.join(sorted(unread))}: remove it from scripts/gen_docs.py")
    variables = {}
    for name, extra in table.items():
        if name in unread:
            continue
        default = reads[name]
        if default is missing and extra.default_text is None:
            problems.append(f"{source} computes the default of {name}: give it default_text in scripts/gen_docs.py")
            continue
        shown = None if default is missing else env_value(default)
        variables[name] = Variable(name, shown, extra.default_text, False, extra.description)
    if problems:
        raise DocsError("; ".join(problems))
    return variables


def front_reads() -> dict[str, object]:
    """What the front's renderer and ``make run-prod`` read, with their defaults (they must agree)."""
    reads = python_reads(FRONT_RENDER, _is_render_env)
    for name, default in shell_reads(RUN_PROD, r"FRONT_[A-Z_]+|BACKEND_PORT").items():
        known = reads.get(name)
        if known not in (None, missing) and default is not None and env_value(known) != default:
            raise DocsError(f"{name}: deploy/nginx/render.py and scripts/run-prod.sh have different defaults")
        if known in (None, missing):
            reads[name] = default
    return reads


def all_variables() -> dict[str, Variable]:
    settings = schema_variables()
    gunicorn = extra_variables(GUNICORN_VARIABLES, python_reads(GUNICORN_CONF), "gunicorn.conf.py", settings)
    front = extra_variables(FRONT_VARIABLES, front_reads(), "the front", settings)
    return {**settings, **gunicorn, **front}


def grouped(variables: dict[str, Variable]) -> list[tuple[Group, list[Variable]]]:
    """The groups in page order, each with the variables that exist; the rest under "Other settings"."""
    placed = {name for group in GROUPS for name in group.names}
    groups = [(group, [variables[name] for name in group.names if name in variables]) for group in GROUPS]
    rest = [variable for name, variable in variables.items() if name not in placed]
    if rest:
        groups.append((Group(OTHER, "", ()), rest))
    return [(group, members) for group, members in groups if members]


# -- writing the pages ------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default_cell(variable: Variable) -> str:
    if variable.required:
        return "(required)"
    if variable.default_text is not None:
        return _cell(variable.default_text)
    if variable.default is None:
        return "(none)"
    return f"`{_cell(variable.default)}`"


def configuration_md(variables: dict[str, Variable]) -> str:
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `make docs` (scripts/gen_docs.py) from app/settings.py, gunicorn.conf.py,",
        "     deploy/nginx/render.py and scripts/run-prod.sh: edit those, then run `make docs`. -->",
        "",
        "All settings come from the environment. The service validates them once, at start: a bad or missing value",
        "stops the process with one line naming the variable, never its value. `.env.example` lists every variable",
        "with its default; docker compose reads a copy of it named `.env`.",
    ]
    for group, members in grouped(variables):
        lines += ["", f"## {group.title}", ""]
        if group.intro:
            lines += [*textwrap.wrap(group.intro, 110, break_on_hyphens=False, break_long_words=False), ""]
        lines += ["| Variable | Default | Meaning |", "|---|---|---|"]
        for variable in members:
            lines.append(f"| `{variable.name}` | {_default_cell(variable)} | {_cell(variable.description)} |")
    return "\n".join(lines) + "\n"


_SEE_LINK = re.compile(r"\s*\(see \[[^\]]+\]\([^)]+\)\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]+\)")
_EMPHASIS = re.compile(r"\*(\w[^*]*)\*")


def plain(text: str) -> str:
    """Markdown as a comment line shows it: no "(see [page](link))", links as their text, no backticks
    or emphasis."""
    return _LINK.sub(r"\1", _EMPHASIS.sub(r"\1", _SEE_LINK.sub("", text))).replace("`", "")


def first_sentence(text: str) -> str:
    match = re.search(r"\.\s", text)
    return text if match is None else text[: match.start() + 1]


def env_example(variables: dict[str, Variable]) -> str:
    lines = [
        "# Every variable the service (and its front) reads, with its default. Copy to .env and fill in the keys;",
        "# lines left commented keep their default. Generated by `make docs` from app/settings.py, gunicorn.conf.py",
        "# and the front's scripts: docs/configuration.md explains each.",
    ]
    for group, members in grouped(variables):
        lines += ["", f"# --- {group.title} ---"]
        for variable in members:
            hint = plain(first_sentence(variable.description))
            if variable.default is None and variable.default_text is not None:
                hint += f" Default: {variable.default_text}."
            lines += textwrap.wrap(hint, 110, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)
            value = variable.default if variable.default is not None else ENV_EXAMPLES.get(variable.name, "")
            if variable.name in ENV_SET:
                lines.append(f"{variable.name}={ENV_EXAMPLES[variable.name]}")
            else:
                lines.append(f"# {variable.name}={value}")
    return "\n".join(lines) + "\n"


def outputs() -> dict[Path, str]:
    """Every generated file and its text.

    :raises DocsError: when the code and the tables here disagree.
    """
    variables = all_variables()
    return {CONFIGURATION_MD: configuration_md(variables), ENV_EXAMPLE: env_example(variables)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gen_docs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale; write nothing")
    args = parser.parse_args(argv)
    try:
        generated = outputs()
    except DocsError as exc:
        print(f"gen_docs: {exc}", file=sys.stderr)
        return 1
    stale = [path for path, text in generated.items() if not path.exists() or path.read_text("utf-8") != text]
    if args.check:
        for path in stale:
            print(f"gen_docs: {path.relative_to(ROOT)} is stale: run `make docs`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(generated[path], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
