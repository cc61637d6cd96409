"""Byte sizes written the way people write them in YAML: ``8GiB``, ``512MiB``, ``4096``.

- ``parse_size(value)``  ``"8GiB"`` -> ``8589934592``; ints pass through
- ``Size``               an ``int`` field type for pydantic models that accepts both forms

Binary units (``KiB``, ``MiB``, ``GiB``, ``TiB``) are powers of 1024, decimal units (``kB``,
``MB``, ``GB``, ``TB``) powers of 1000. A bare letter (``8G``, as ``dd`` and ``docker -m`` write
it) means the binary unit, because cache and page sizes are powers of two in practice. Units are
case-insensitive; fractions are accepted when they come out as whole bytes (``1.5GiB``). Sizes
stop at :data:`MAX_SIZE` (4 EiB): larger ones cannot be a file offset, an mmap length or a
C ``size_t`` of a 64-bit machine, and would fail deep inside a backend instead of in the config.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["MAX_SIZE", "Size", "format_size", "parse_size"]

#: The largest size accepted: 2**62 bytes, a quarter of what a signed 64-bit offset reaches.
MAX_SIZE = 1 << 62

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 1000**4,
}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*\Z")


def parse_size(value: str | int) -> int:
    """Return the number of bytes ``value`` denotes; raise ``ValueError`` naming it otherwise.

    Accepts a non-negative ``int`` or a string such as ``"8GiB"``, ``"512 MiB"``, ``"1.5G"``,
    ``"100MB"`` or ``"4096"``.
    """
    # bool is an int subclass; `capacity: true` in YAML is a mistake, not one byte.
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: expected a byte count or a string like '8GiB'")
    if isinstance(value, int):
        return _bounded(value, value)
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r}: expected a byte count or a string like '8GiB'")
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {value!r}: expected a number with an optional unit "
            "(B, KiB, MiB, GiB, TiB, kB, MB, GB, TB), e.g. '8GiB'"
        )
    try:
        amount = Decimal(match.group(1)) * _UNITS[unit]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"invalid size {value!r}") from exc
    if amount != amount.to_integral_value():
        raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
    return _bounded(int(amount), value)


def _bounded(nbytes: int, value: str | int) -> int:
    if nbytes < 0:
        raise ValueError(f"invalid size {value!r}: must not be negative")
    if nbytes > MAX_SIZE:
        raise ValueError(f"invalid size {value!r}: larger than the maximum of 2**62 bytes")
    return nbytes


def format_size(nbytes: int) -> str:
    """Render ``nbytes`` with the largest binary unit that keeps it readable (``"8 GiB"``)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _validate(value: Any) -> Any:
    # Leave other types to pydantic's int validation so its error message stays standard.
    if isinstance(value, str | int):
        return parse_size(value)
    return value


#: A size field: accepts ``8GiB``-style strings or ints, stores an ``int`` of bytes.
Size = Annotated[
    int,
    BeforeValidator(_validate),
    PlainSerializer(int, return_type=int),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_SIZE},
                {"type": "string", "pattern": r"^\s*[0-9.]+\s*[a-zA-Z]*\s*$"},
            ],
            "description": "bytes, or a string such as '8GiB', '512MiB', '100MB'",
        }
    ),
]
