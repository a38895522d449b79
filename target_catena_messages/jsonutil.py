"""JSON encoding shared by bodies, hashes, dead letters and STATE.

Records reach sinks with ``Decimal`` numbers and ``datetime`` values (singer-sdk parses input that
way), which the stdlib encoder rejects. msgspec encodes both, keeps decimals as JSON numbers and is
several times faster than ``json`` on the per-record path.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

_ENCODER = msgspec.json.Encoder(decimal_format="number")
_CANONICAL = msgspec.json.Encoder(decimal_format="number", order="sorted")
_LENIENT = msgspec.json.Encoder(decimal_format="number", enc_hook=str)


def dumps(obj: Any) -> str:
    """Encode compactly; keys keep their order."""
    return _ENCODER.encode(obj).decode()


def dumps_lenient(obj: Any) -> str:
    """Like :func:`dumps`, but a value of an unknown type is written as its ``str()``.

    For dead letters: a record must never fail to be written because it held an odd type.
    """
    return _LENIENT.encode(obj).decode()


def canonical(obj: Any) -> bytes:
    """Encode with sorted keys and no whitespace: equal data, equal bytes (for hashing)."""
    return _CANONICAL.encode(obj)


def sha256_hex(obj: Any) -> str:
    """SHA-256 hex digest of the canonical encoding."""
    return hashlib.sha256(canonical(obj)).hexdigest()


def loads(data: str | bytes) -> Any:
    """Decode JSON."""
    return msgspec.json.decode(data)
