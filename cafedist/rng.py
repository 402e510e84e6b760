"""Deterministic seeds derived from keys, so a run does not depend on how it is split.

Every random stream in cafedist is keyed, not sequential: a client's shuffling in round t
uses ``derive_seed(seed, "shuffle", client_id, t)``, the proxy subset of round t uses
``derive_seed(seed, "proxy", t)``. A stream therefore never depends on which rank hosts a
client, on how many clients a rank hosts, or on whether the run was resumed.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*keys: object) -> int:
    """Map a tuple of keys (ints, strings) to a stable 63-bit seed (same on every platform)."""
    text = "\x1f".join(str(k) for k in keys).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def generator(*keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with :func:`derive_seed` of ``keys``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*keys))
    return g
