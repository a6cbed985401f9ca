"""Print a requirements lock from a ``pip install --dry-run --report`` file."""

from __future__ import annotations

import json
import sys

report = json.load(open(sys.argv[1], encoding="utf-8"))
pins = sorted(
    f"{item['metadata']['name'].lower()}=={item['metadata']['version']}"
    for item in report["install"]
    if item["metadata"]["name"] != "amplitude-braze-profile-proxy"
)
print("# Runtime dependencies, pinned: the Docker image installs these and CI audits them.")
print("# Regenerate with `make lock` after changing pyproject.toml.")
print("\n".join(pins))
