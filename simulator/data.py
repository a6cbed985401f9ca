"""Deterministic profile data per identity, shaped as Amplitude's User Profile API answers.

Everything derives from sha256 of ``kind:identity[:part]`` (kind ``user`` or ``device``), so
an id always gets the same profile, in every process. The rules (the docs and the tests
rely on them):

- an id starting with ``unknown`` (``unknown-1``) has never been seen: the unknown-user error,
  for user ids and device ids alike;
- an id starting with ``new-`` or ``inactive-`` is known, but its ``recommendations`` is null
  even when asked for;
- an id starting with ``control-`` (``control-1``) is in the control group (``is_control``)
  of every recommendation, unless the request gives ``rec_type``;
- every other id (``user-42``, ``device-abc``) is a known identity. About 10% of
  (identity, rec id) pairs are in a control group; ``user-42`` is in none of the default ones;
- ``user-42`` is always in ``cohort_vip`` (special-cased; its hash adds ``cohort_newsletter``);
  other ids get each of :data:`COHORTS` with probability 0.3, so possibly none (``user-1``);
- user properties: ``first_name``, ``plan``, ``city``, ``lifetime_value``, ``sessions_30d``;
- computations are :data:`COMPUTATIONS` (id to name) and come back keyed by name;
- the recommendation ids of :data:`DEFAULT_REC_IDS` exist; any other is absent from answers;
  each has 50 items ``sku-NNNNN`` (another list for ``rec_type=random``, source ``random``);
- every prediction id has a value: a score in [0, 1] (4 decimals) or a percentile 0..100;
- a user's ``device_id`` (and a device's ``user_id``) is ``device-NNNNNNNN``
  (``user-NNNNNNNN``), or null for about 20% (``user-5``, ``device-1``).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

DEFAULT_REC_IDS = frozenset({"rec_home", "rec_email", "rec_cart"})
COHORTS = ("cohort_vip", "cohort_churn_risk", "cohort_newsletter", "cohort_high_value", "cohort_dormant")
COMPUTATIONS = {
    "cmp_fav": "computed_favorite_category",
    "cmp_p90": "computed_purchases_90d",
    "cmp_ltv": "computed_ltv_bucket",
}
FIRST_NAMES = ("Ada", "Grace", "Alan", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Frances", "Guido")
PLANS = ("free", "pro", "enterprise")
CITIES = ("Berlin", "Lisbon", "Austin", "Toronto", "Osaka", "Nairobi", "Lyon", "Denver")
CATEGORIES = ("shoes", "outdoor", "books", "kitchen", "music", "games")
BASE_EPOCH = 1_764_000_000
NO_RECOMMENDATIONS_PREFIXES = ("new-", "inactive-")
CONTROL_PREFIX = "control-"


def _rng(*parts: str) -> random.Random:
    # surrogatepass: a caller in Python may hand over any str, lone surrogates included.
    digest = hashlib.sha256(":".join(parts).encode("utf-8", "surrogatepass")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def is_unknown(identity: str) -> bool:
    """Whether the identity has never been seen (the unknown-user error)."""
    return identity.startswith("unknown")


def has_recommendations(identity: str) -> bool:
    """Whether a known identity gets recommendations at all."""
    return not identity.startswith(NO_RECOMMENDATIONS_PREFIXES)


def user_properties(kind: str, identity: str) -> dict[str, Any]:
    """The identity's user properties (``get_amp_props``)."""
    rng = _rng(kind, identity, "props")
    return {
        "first_name": rng.choice(FIRST_NAMES),
        "plan": rng.choice(PLANS),
        "city": rng.choice(CITIES),
        "lifetime_value": round(rng.uniform(0, 2000), 2),
        "sessions_30d": rng.randint(0, 60),
    }


def computations(kind: str, identity: str, comp_ids: list[str] | None) -> dict[str, Any]:
    """Computed properties by name: all of them, or those of *comp_ids* (unknown ids ignored)."""
    rng = _rng(kind, identity, "comp")
    values = {
        "computed_favorite_category": rng.choice(CATEGORIES),
        "computed_purchases_90d": rng.randint(0, 25),
        "computed_ltv_bucket": rng.choice(("low", "medium", "high")),
    }
    wanted = COMPUTATIONS.values() if comp_ids is None else [COMPUTATIONS[c] for c in comp_ids if c in COMPUTATIONS]
    return {name: values[name] for name in wanted}


def cohort_ids(kind: str, identity: str) -> list[str]:
    """The tracked cohorts the identity belongs to (possibly none)."""
    rng = _rng(kind, identity, "cohorts")
    chosen = [cohort for cohort in COHORTS if rng.random() < 0.3]
    if identity == "user-42" and "cohort_vip" not in chosen:
        chosen.insert(0, "cohort_vip")  # the documentation's VIP example
    return chosen


def recommendation(kind: str, identity: str, rec_id: str, rec_type: str | None) -> dict[str, Any]:
    """One recommendation object for a known rec id."""
    rng = _rng(kind, identity, rec_id, rec_type or "model")
    items = [f"sku-{n:05d}" for n in rng.sample(range(100_000), 50)]
    if rec_type is not None:
        is_control = False  # rec_type overrides the experiment's control assignment
    else:
        is_control = identity.startswith(CONTROL_PREFIX) or _rng(kind, identity, rec_id, "control").random() < 0.1
    return {
        "rec_id": rec_id,
        "child_rec_id": f"{rec_id}-child",
        "items": items,
        "is_control": is_control,
        "recommendation_source": "random" if rec_type == "random" else "model_v3",
        "last_updated": BASE_EPOCH + rng.randint(0, 86_400 * 7),
    }


def propensity(kind: str, identity: str, prediction_id: str, propensity_type: str) -> float | int:
    """A prediction's value: a score in [0, 1] or a percentile 0..100."""
    score = _rng(kind, identity, "pred", prediction_id).random()
    return round(score, 4) if propensity_type == "score" else int(score * 100)


def other_identity(kind: str, identity: str) -> str | None:
    """The device id of a user (or user id of a device), or None for some."""
    rng = _rng(kind, identity, "other")
    if rng.random() < 0.2:
        return None
    prefix = "device" if kind == "user" else "user"
    return f"{prefix}-{rng.randint(0, 10**8):08d}"


def user_data(kind: str, identity: str, flags: dict[str, Any], rec_ids: frozenset[str]) -> dict[str, Any]:
    """Build the ``userData`` object for a known identity and the request's flags."""
    other = other_identity(kind, identity)
    data: dict[str, Any] = {
        "recommendations": None,
        "user_id": identity if kind == "user" else other,
        "device_id": identity if kind == "device" else other,
        "amp_props": None,
        "cohort_ids": None,
    }
    if flags["get_amp_props"] or flags["get_computations"]:
        # Amplitude merges computations into the user properties, keyed by name.
        props: dict[str, Any] = {}
        if flags["get_amp_props"]:
            props.update(user_properties(kind, identity))
        if flags["get_computations"]:
            props.update(computations(kind, identity, flags["comp_id"]))
        data["amp_props"] = props
    if flags["get_cohort_ids"]:
        data["cohort_ids"] = cohort_ids(kind, identity)
    if flags["get_recs"] and has_recommendations(identity):
        data["recommendations"] = [
            recommendation(kind, identity, rec_id, flags["rec_type"]) for rec_id in flags["rec_id"] if rec_id in rec_ids
        ]
    if flags["get_propensity"]:
        ptype = flags["propensity_type"]
        data["propensities"] = [
            {"prop": propensity(kind, identity, pid, ptype), "pred_id": pid, "prop_type": ptype}
            for pid in flags["prediction_id"]
        ]
        data["propensity"] = data["propensities"][0]["prop"] if data["propensities"] else None
    return data
