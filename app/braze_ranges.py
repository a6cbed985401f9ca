"""Braze's published sending addresses per cluster, so ``ALLOWED_CIDRS`` can say ``braze:US-01``.

The list ships in ``braze_ranges.json`` beside this module, with the date it was taken
and where from; docs/operations.md ("Security") says how to refresh it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

#: How a named entry starts in ``ALLOWED_CIDRS``.
PREFIX = "braze:"


@dataclass(frozen=True)
class BrazeRanges:
    """The shipped list: cluster name → addresses, and its provenance."""

    taken: str
    source: str
    clusters: dict[str, tuple[str, ...]]

    def addresses(self, cluster: str) -> tuple[str, ...]:
        """The addresses Braze sends from for *cluster* (``US-01``, any case).

        :raises KeyError: a cluster the shipped list does not name.
        """
        return self.clusters[cluster.strip().upper()]


@functools.cache
def braze_ranges() -> BrazeRanges:
    """Load the shipped list once."""
    raw = json.loads(resources.files("app").joinpath("braze_ranges.json").read_text(encoding="utf-8"))
    clusters: dict[str, tuple[str, ...]] = {}
    for group in raw["groups"]:
        for cluster in group["clusters"]:
            clusters[cluster.upper()] = tuple(group["addresses"])
    return BrazeRanges(taken=raw["taken"], source=raw["source"], clusters=clusters)


def is_named(entry: str) -> bool:
    """Whether an ``ALLOWED_CIDRS`` entry names a Braze cluster rather than a network."""
    return entry.lower().startswith(PREFIX)


def resolve(entry: str) -> tuple[str, ...]:
    """``braze:US-01`` as that cluster's addresses; any other entry as itself.

    :raises ValueError: naming a cluster the shipped list does not have.
    """
    if not is_named(entry):
        return (entry,)
    ranges = braze_ranges()
    cluster = entry[len(PREFIX) :]
    try:
        return ranges.addresses(cluster)
    except KeyError:
        known = ", ".join(sorted(ranges.clusters))
        raise ValueError(
            f"{entry!r} is not a Braze cluster in the shipped list (taken {ranges.taken}): known are {known}"
        ) from None
