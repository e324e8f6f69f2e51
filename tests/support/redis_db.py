"""Claim an empty Redis database for one test, so that its coordinator sees only its own state."""

from __future__ import annotations

from collections.abc import Iterable

import redis


def claim_empty_db(base_url: str, dbs: Iterable[int], token: str, claim_key: str) -> int:
    """The first database in ``dbs`` that is empty, marked with ``claim_key`` = ``token``."""
    for db in dbs:
        r = redis.Redis.from_url(f"{base_url.rstrip('/')}/{db}")
        if r.dbsize() == 0 and r.set(claim_key, token, nx=True):
            if r.dbsize() == 1:
                return db
            r.delete(claim_key)
    raise RuntimeError(f"no empty Redis database left among {list(dbs)}")
