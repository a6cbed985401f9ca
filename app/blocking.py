"""Calls that block in C (SQLite, a write to a stalled pipe) kept off the worker's one thread.

Under gunicorn's gevent worker (the shipped worker class) every request of a process runs
on one OS thread, and a greenlet gives way to the others only when it waits on something
gevent knows of: a socket, a lock, a sleep. A C call that blocks (SQLite waiting for the
file's write lock, ``write`` to a pipe nobody reads) would stall every request of the
process. :func:`offload` runs such a call on gevent's pool of real threads, and only the
calling greenlet waits for it. Under plain threads (the test server, gthread) it calls
directly: the call then blocks its own thread only.

What runs offloaded must not touch gevent's primitives (a lock made after patching, a
patched queue): they belong to the worker's thread. Take locks before offloading and do
the bookkeeping after; offload the C call itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def cooperative() -> bool:
    """Whether this process runs under gevent's monkey-patching (the gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def offload(function: Callable[..., T], *args: object) -> T:
    """Run ``function(*args)`` where its blocking cannot stall other requests, and return its result."""
    if cooperative():
        import gevent

        return gevent.get_hub().threadpool.apply(function, args)  # type: ignore[no-any-return]
    return function(*args)
