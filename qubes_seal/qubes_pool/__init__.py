"""A ``qubes.storage`` pool driver for qubesd: each qube's volumes encrypted with its own key.

``qvm-pool add vault qubes_seal -o inner_pool=varlibqubes`` wraps an existing pool (the inner
pool keeps the ciphertext) and maps each volume with dm-crypt, keyed by the qube's per-domain
key from the dom0 key service.  Which key each volume kind gets, and what is refused:
docs/QUBES-POOL.md.  This package imports ``qubes`` (qubes-core-admin, dom0 only) and nothing
in the rest of qubes-seal imports this package.
"""

from __future__ import annotations

from .pool import EncryptedPool, EncryptedVolume, PoolError

__all__ = ["EncryptedPool", "EncryptedVolume", "PoolError"]
