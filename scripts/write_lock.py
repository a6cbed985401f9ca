"""Print a requirements lock from a ``pip install --dry-run --report`` file.

``write_lock.py REPORT`` pins everything the report installs (the runtime lock);
``write_lock.py REPORT --except requirements.lock`` pins what is not already in that lock
(the development lock: test, lint and benchmark tools, resolved against the runtime pins).
"""

from __future__ import annotations

import json
import sys

PROJECT = "amplitude-braze-profile-proxy"

report = json.load(open(sys.argv[1], encoding="utf-8"))
skip = {PROJECT}
if len(sys.argv) == 4 and sys.argv[2] == "--except":
    with open(sys.argv[3], encoding="utf-8") as runtime:
        skip |= {line.split("==")[0] for line in runtime if "==" in line}
pins = sorted(
    f"{item['metadata']['name'].lower()}=={item['metadata']['version']}"
    for item in report["install"]
    if item["metadata"]["name"].lower() not in skip
)
if len(skip) == 1:
    print("# Runtime dependencies, pinned: the Docker image installs these and CI audits them.")
else:
    print("# Test, lint and benchmark tools, pinned against requirements.lock: `make install` installs both.")
print("# Regenerate both with `make lock` after changing pyproject.toml.")
print("\n".join(pins))
