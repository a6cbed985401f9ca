"""``python -m bench.sim_nodelay ARGS``: ``python -m simulator ARGS``, with TCP_NODELAY on its sockets.

``http.server`` writes a response's headers and body in separate small writes. Unless
the handler disables Nagle's algorithm, the second write on a keep-alive connection
waits for the client's delayed ACK: every answer after the first on a connection then
takes ~40 ms more than ``--latency-ms``, which real Amplitude does not, and which both
the service's pooled upstream connections and wrk's keep-alive connections would pay.
This wrapper sets ``disable_nagle_algorithm`` on the simulator's handler class before
serving; where the simulator already sets it, it changes nothing. ``python -m bench
--sim-nagle`` runs ``python -m simulator`` itself instead.
"""

from __future__ import annotations

import importlib
from typing import Any


def handler_class() -> Any:
    """The simulator's request handler class, wherever this version of it keeps it."""
    for module_name in ("simulator.handler", "simulator.server"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        handler = getattr(module, "_Handler", None)
        if handler is not None:
            return handler
    return None


if __name__ == "__main__":
    from simulator.__main__ import main

    handler = handler_class()
    if handler is not None:
        handler.disable_nagle_algorithm = True
    main()
