"""API keys: `hwp_<prefix>_<secret>`; only sha256(key) is stored, compared with `hmac.compare_digest`.

The secret has 256 bits of entropy, so a fast unsalted hash is enough (no dictionary to attack); the prefix
is a lookup handle so verification reads one row instead of hashing against every key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session

from db.models import ApiKey, Tenant


@dataclass(frozen=True)
class KeyOwner:
    """The tenant a verified key belongs to, as plain values: safe to cache and to share between threads."""

    id: str
    name: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str) -> tuple[Tenant, str]:
    """Create (or reuse) the tenant and a fresh key for it; returns the plaintext key once."""
    name = tenant_name.strip()
    assert name, "tenant name must not be empty"
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    prefix = secrets.token_hex(6)
    key = f"hwp_{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key)))
    session.flush()
    return tenant, key


_KEY_AND_TENANT = (select(ApiKey.key_hash, ApiKey.revoked_at, Tenant.id, Tenant.name)
                   .join(Tenant, Tenant.id == ApiKey.tenant_id).where(ApiKey.prefix == bindparam("prefix")))


def verify_key(conn: Session | Connection, key: str) -> KeyOwner | None:
    """The tenant a key belongs to, or None (unknown, malformed or revoked: callers answer 401 alike)."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "hwp" or len(parts[1]) != 12:
        return None
    found = conn.execute(_KEY_AND_TENANT, {"prefix": parts[1]}).first()  # one round trip: key and tenant together
    if found is None or found.revoked_at is not None:
        # Hash anyway so unknown prefixes take as long as known ones.
        hmac.compare_digest(hash_key(key), "0" * 64)
        return None
    if not hmac.compare_digest(hash_key(key), found.key_hash):
        return None
    return KeyOwner(found.id, found.name)
