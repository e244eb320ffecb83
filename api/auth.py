"""API-key authentication with a small in-process cache of verified keys.

Every request but `/healthz` carries a key; verifying it is a database round trip (db/keys.py). A status poll
repeats the same key many times a second, so a verified key is remembered for `auth_cache_s` seconds:

- keyed by the sha256 of the key (the digest the database stores), never the plaintext;
- positive answers only: an unknown or revoked key goes to the database every time, so a wrong key can neither
  fill the cache nor be answered from it;
- bounded (`auth_cache_size` keys; the oldest entry goes first) and per process: each API process has its own;
- revocation (`api_keys.revoked_at` set, or the tenant deleted) takes effect within `auth_cache_s` seconds in
  every process; `auth_cache_s = 0` switches the cache off (every request reads the database).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from api.reads import ReadPool
from db.keys import KeyOwner, hash_key, verify_key


class KeyCache:
    """sha256(key) -> (owner, expiry); thread-safe, first in first out once full."""

    def __init__(self, ttl_s: float, max_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        assert ttl_s >= 0 and max_size >= 1, "ttl_s must be >= 0 and max_size >= 1"
        self.ttl_s, self.max_size, self.clock = ttl_s, max_size, clock
        self._entries: OrderedDict[str, tuple[KeyOwner, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> KeyOwner | None:
        with self._lock:
            hit = self._entries.get(digest)
            if hit is None:
                return None
            if self.clock() >= hit[1]:
                del self._entries[digest]
                return None
            return hit[0]

    def put(self, digest: str, owner: KeyOwner) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._entries.pop(digest, None)  # a re-verified key moves to the back with a fresh expiry
            self._entries[digest] = (owner, self.clock() + self.ttl_s)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Authenticator:
    """Resolves a bearer key to its tenant: from the cache, else one query (api/reads.py)."""

    def __init__(self, reads: ReadPool, ttl_s: float, max_size: int) -> None:
        self.reads = reads
        self.cache = KeyCache(ttl_s, max_size)

    async def owner(self, key: str) -> KeyOwner | None:
        digest = hash_key(key)
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        owner = await self.reads.run(lambda conn: verify_key(conn, key))
        if owner is not None:
            self.cache.put(digest, owner)
        return owner
