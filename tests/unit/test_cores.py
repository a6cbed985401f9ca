"""How many workers the default configuration starts: the cores this process may use.

``available_cores`` lives in gunicorn.conf.py, which sets up the environment when it is
imported; the function alone is compiled from it here, with the cgroup files it reads
redirected to a temporary directory.
"""

from __future__ import annotations

import ast
import builtins
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from testkit.processes import ROOT

V2 = "/sys/fs/cgroup/cpu.max"
V1_QUOTA, V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def available_cores(files: dict[str, str], tmp_path: Path) -> Callable[[], int]:
    """gunicorn.conf.py's function, reading *files* ({cgroup path: content}) instead of the real ones."""
    tree = ast.parse((ROOT / "gunicorn.conf.py").read_text())
    (function,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "available_cores"]
    redirected = {}
    for number, (path, content) in enumerate(files.items()):
        redirected[path] = tmp_path / f"cgroup-{number}"
        redirected[path].write_text(content)

    def fake_open(path: str, *args: object, **kwargs: object) -> object:
        if path.startswith("/sys/fs/cgroup/"):
            if path not in redirected:
                raise FileNotFoundError(path)
            path = str(redirected[path])
        return builtins.open(path, *args, **kwargs)  # type: ignore[call-overload]

    namespace: dict[str, object] = {"os": os, "open": fake_open}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "gunicorn.conf.py", "exec"), namespace)
    return namespace["available_cores"]  # type: ignore[return-value]


ALLOWED = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, ALLOWED),  # no cgroup files: the affinity
        ({V2: "max 100000\n"}, ALLOWED),  # cgroup v2 without a limit
        ({V2: "100000 100000\n"}, 1),  # --cpus=1
        ({V2: "50000 100000\n"}, 1),  # half a CPU still runs one worker
        ({V2: "150000 100000\n"}, min(2, ALLOWED)),  # 1.5 CPUs round up, never above the affinity
        ({V2: "6400000 100000\n"}, ALLOWED),  # a limit above the cores this process may use
        ({V1_QUOTA: "-1\n", V1_PERIOD: "100000\n"}, ALLOWED),  # cgroup v1 without a limit
        ({V1_QUOTA: "100000\n", V1_PERIOD: "100000\n"}, 1),  # cgroup v1, one CPU
        ({V2: "garbage\n"}, ALLOWED),  # unreadable: the affinity
    ],
)
def test_workers_follow_the_cores_this_process_may_use(files, expected, tmp_path):
    assert available_cores(files, tmp_path)() == expected
