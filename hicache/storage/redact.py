"""Keeping credentials inside the process: the one redaction helper every output goes through.

- ``is_secret_name(name)``  True for option names that hold credentials (``secret_access_key``,
                            ``token``, ``password``, ``*_key``, ``credentials``, ...)
- ``redact_url(text)``      ``scheme://user:pass@host/...`` -> ``scheme://***@host/...``, for a
                            URL or any text holding URLs (a client library's error message)
- ``redact(value, name)``   a value fit for a log line, an error, ``config show`` or a report:
                            secrets by name or type masked, URLs stripped of userinfo, mappings
                            and lists walked
- ``RedactedUrl``           a ``str`` option type for URLs that may carry userinfo: its JSON
                            dump (``config show``, reports) masks it, the value stays whole
- ``reveal(value)``         the inverse for the one place a secret must leave pydantic's
                            wrapper: the call into the client library

Secret option fields are typed :class:`pydantic.SecretStr`, whose ``repr`` and JSON dump are
masked; free-form mappings handed to a client library (fsspec's ``storage_options``) are masked
by key name, because their schema belongs to someone else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import PlainSerializer, SecretStr

__all__ = [
    "MASK",
    "SECRET_HINTS",
    "RedactedUrl",
    "is_secret_name",
    "redact",
    "redact_url",
    "reveal",
]

#: What a masked value shows (pydantic's own mask for ``SecretStr``).
MASK = "**********"
#: Substrings of an option name that mark its value as a credential.
SECRET_HINTS = ("secret", "token", "password", "passwd", "key", "credential", "auth")
#: A URL's scheme and userinfo: the authority up to its last "@" (a password may hold one).
_USERINFO_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def is_secret_name(name: object) -> bool:
    """True when an option called ``name`` holds, or may hold, a credential."""
    if not isinstance(name, str):
        return False
    lowered = name.lower()
    return any(hint in lowered for hint in SECRET_HINTS)


def redact_url(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it masked."""
    if "@" not in text:
        return text
    return _USERINFO_RE.sub(r"\g<scheme>***@", text)


RedactedUrl = Annotated[str, PlainSerializer(redact_url, return_type=str, when_used="json")]


def redact(value: Any, name: object = None) -> Any:
    """A copy of ``value`` safe to print, log or report.

    ``name`` is the option (or mapping key) ``value`` belongs to: a secret-looking name masks
    the value whatever it is. ``SecretStr`` values are masked, strings lose URL userinfo,
    mappings are redacted key by key and sequences item by item; anything else is returned as
    it is (numbers, booleans, enums carry no secrets).
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, SecretStr) or is_secret_name(name):
        return MASK
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, Mapping):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


def reveal(value: Any) -> Any:
    """``value`` with every ``SecretStr`` (also inside mappings and lists) unwrapped."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Mapping):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(reveal(v) for v in value)
    return value
