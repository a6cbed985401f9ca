"""What is asked of Amplitude (a :class:`ProfileQuery`) and what is kept of its answer."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote_plus, urlencode

from app.settings import Settings

KINDS = {"users": "user_id", "devices": "device_id"}

#: Identities Amplitude's ingestion refuses (HTTP V2 API documentation, "Invalid IDs"),
#: compared trimmed and case-insensitively: no profile can exist under them. Braze renders
#: such values when a template reads a missing attribute.
NEVER_STORED = frozenset(
    {"", '""', "anonymous", "nil", "none", "null", "n/a", "na", "undefined", "unknown",
     "00000000-0000-0000-0000-000000000000", "{}", "lmy47d", "0", "-1"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a lookup is about: ``id_field`` is ``user_id`` or ``device_id``."""

    id_field: str
    value: str
    #: The identity in cache keys (computed once: a request reads it several times).
    cache_token: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Hashing keeps keys short and free of whatever bytes an id holds;
        # the NUL separator cannot occur in a validated id, so two identities never mix.
        token = hashlib.sha256(f"{self.id_field}\0{self.value}".encode()).hexdigest()[:32]
        object.__setattr__(self, "cache_token", token)

    @property
    def never_stored(self) -> bool:
        """Whether Amplitude refuses this value as an identity, so asking would only spend budget."""
        return self.value.strip().lower() in NEVER_STORED


@dataclass(frozen=True, slots=True)
class ProfileQuery:
    """One Amplitude request: an identity and the parts of the profile it asks for."""

    identity: Identity
    properties: bool = False
    cohorts: bool = False
    rec_ids: tuple[str, ...] = ()
    rec_type: str | None = None
    prediction_ids: tuple[str, ...] = ()
    propensity_type: str | None = None
    #: Where the answer is cached: the identity and the shape of the request (computed once).
    cache_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = (
            "p" if self.properties else "",
            "c" if self.cohorts else "",
            ",".join(self.rec_ids),
            self.rec_type or "",
            ",".join(self.prediction_ids),
            self.propensity_type or "" if self.prediction_ids else "",
        )
        object.__setattr__(self, "cache_key", f"{self.identity.cache_token}:{_shape_token(parts)}")

    def upstream_query(self) -> str:
        """The query string for ``/v1/userprofile``: the identity URL-encoded whole (any
        ``&``, ``#``, ``/`` or comma in it stays part of the one value); the comma lists
        (``rec_id=a,b``) keep their commas, as Amplitude documents them. Everything but the
        identity is the request's shape, encoded once per shape."""
        head = f"{self.identity.id_field}={quote_plus(self.identity.value)}"
        tail = _shape_query(*self._shape())
        return f"{head}&{tail}" if tail else head

    def upstream_params(self) -> list[tuple[str, str]]:
        """Query parameters for ``/v1/userprofile``, identity first (see :meth:`upstream_query`)."""
        return [(self.identity.id_field, self.identity.value), *_shape_params(*self._shape())]

    def _shape(self) -> tuple[bool, bool, tuple[str, ...], str | None, tuple[str, ...], str | None]:
        return (self.properties, self.cohorts, self.rec_ids, self.rec_type, self.prediction_ids,
                self.propensity_type)  # fmt: skip

    @property
    def negative_key(self) -> str:
        """Where "Amplitude has not seen this identity" is kept: one per identity, whatever the shape."""
        return f"{self.identity.cache_token}:unknown"


@functools.lru_cache(maxsize=256)
def _shape_params(
    properties: bool, cohorts: bool, rec_ids: tuple[str, ...], rec_type: str | None,
    prediction_ids: tuple[str, ...], propensity_type: str | None,
) -> tuple[tuple[str, str], ...]:  # fmt: skip
    """The parameters that follow the identity, for one request shape."""
    params: list[tuple[str, str]] = []
    if properties:
        params += [("get_amp_props", "true"), ("get_computations", "true")]
    if cohorts:
        params.append(("get_cohort_ids", "true"))
    if rec_ids:
        params += [("get_recs", "true"), ("rec_id", ",".join(rec_ids))]
        if rec_type:
            params.append(("rec_type", rec_type))
    if prediction_ids:
        params += [
            ("get_propensity", "true"),
            ("prediction_id", ",".join(prediction_ids)),
            ("propensity_type", propensity_type or "score"),
        ]
    return tuple(params)


@functools.lru_cache(maxsize=256)
def _shape_query(*shape: Any) -> str:
    """:func:`_shape_params` URL-encoded, commas kept (a service asks a handful of shapes)."""
    return urlencode(_shape_params(*shape), safe=",")


@functools.lru_cache(maxsize=256)
def _shape_token(parts: tuple[str, ...]) -> str:
    """A request shape in cache keys (a service asks a handful of shapes, over and over)."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class QueryPlanner:
    """Decide which Amplitude request answers a route, so one user costs one call.

    Every route is served from the user's whole profile (properties, cohorts and the
    configured recommendations and predictions) unless it asks for something that
    profile does not hold; only then does it get a narrower request of its own.
    """

    def __init__(self, settings: Settings) -> None:
        self.rec_ids = tuple(sorted(settings.profile_rec_ids))
        self.prediction_ids = tuple(sorted(settings.profile_prediction_ids))
        self.propensity_type = settings.profile_propensity_type
        # Amplitude logs a recommendation exposure for every call that asks for one.
        self.recs_with_profile = settings.recommendations_fetch == "with_profile"

    def whole(self, identity: Identity) -> ProfileQuery:
        """Everything configured, recommendations included (the whole-profile and recommendation routes)."""
        return ProfileQuery(
            identity=identity,
            properties=True,
            cohorts=True,
            rec_ids=self.rec_ids,
            prediction_ids=self.prediction_ids,
            propensity_type=self.propensity_type if self.prediction_ids else None,
        )

    def profile(self, identity: Identity) -> ProfileQuery:
        """What property, cohort and prediction routes need: the whole profile, or without
        recommendations when ``RECOMMENDATIONS_FETCH=when_asked`` (no exposure logged)."""
        whole = self.whole(identity)
        return whole if self.recs_with_profile else replace(whole, rec_ids=())

    def recommendations(self, identity: Identity, rec_ids: tuple[str, ...], rec_type: str | None) -> ProfileQuery:
        if rec_type is None and set(rec_ids) <= set(self.rec_ids):
            return self.whole(identity)
        return ProfileQuery(identity=identity, rec_ids=tuple(sorted(set(rec_ids))), rec_type=rec_type)

    def prediction(self, identity: Identity, prediction_id: str, propensity_type: str) -> ProfileQuery:
        if propensity_type == self.propensity_type and prediction_id in self.prediction_ids:
            return self.profile(identity)
        return ProfileQuery(identity=identity, prediction_ids=(prediction_id,), propensity_type=propensity_type)


def profile_from_user_data(user_data: dict[str, Any], query: ProfileQuery) -> dict[str, Any]:
    """Keep what routes need of a validated ``userData`` object, with nulls made empty.

    ``recommendations`` stays ``None`` when Amplitude had none for the user (too new,
    inactive), which routes report as ``no_recommendations``.
    """
    recs = user_data.get("recommendations")
    predictions: dict[str, Any] = {}
    for entry in user_data.get("propensities") or ():
        predictions[str(entry["pred_id"])] = entry.get("prop")
    if len(query.prediction_ids) == 1 and query.prediction_ids[0] not in predictions:
        # A single-prediction answer may carry only the scalar ``propensity``.
        if user_data.get("propensity") is not None:
            predictions[query.prediction_ids[0]] = user_data["propensity"]
    return {
        "user_id": user_data.get("user_id"),
        "device_id": user_data.get("device_id"),
        "properties": user_data.get("amp_props") or {},
        "cohort_ids": list(user_data.get("cohort_ids") or []),
        "recommendations": None
        if recs is None
        else {
            str(rec["rec_id"]): {
                "items": list(rec.get("items") or []),
                "is_control": bool(rec.get("is_control", False)),
                "source": rec.get("recommendation_source"),
                "last_updated": rec.get("last_updated"),
            }
            for rec in recs
        },
        "predictions": predictions,
        "propensity_type": query.propensity_type,
    }
