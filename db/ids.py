"""Row ids: 32 lowercase hex chars, time-ordered (48-bit milliseconds + 80 random bits, like UUIDv7).

Time order lets lists paginate by id alone (`cursor` = the last id seen), and a fixed alphabet means ids are
safe to put in artifact paths after `check_id`.
"""

from __future__ import annotations

import re
import secrets
import time

_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def new_id() -> str:
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def is_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value))


def check_id(value: str) -> str:
    """Refuse anything that is not one of our ids before it can reach a filesystem path."""
    assert is_id(value), f"not a row id: {value!r}"
    return value
