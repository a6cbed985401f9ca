"""Caller authentication: Bearer, X-API-Key or Basic auth, compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from app.settings import CallerKey


class CallerKeys:
    """The accepted keys, held as digests so comparison time does not depend on content."""

    def __init__(self, keys: tuple[CallerKey, ...]) -> None:
        self._digests = [(key.name, hashlib.sha256(key.key.encode()).digest()) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def identify(self, presented: str) -> str | None:
        """Return the name of the key *presented* matches, or None."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        match = None
        # Compare against every key, without stopping early, so timing reveals nothing.
        for name, expected in self._digests:
            if hmac.compare_digest(digest, expected):
                match = name
        return match


def presented_key(api_key: str | None, authorization: str | None) -> str | None:
    """The caller key from whichever of the three credential styles the request uses.

    *api_key* and *authorization* are the ``X-API-Key`` and ``Authorization`` headers.
    """
    if api_key:
        return api_key.strip()
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return credentials.strip() or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _user, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None
