"""Random ids for records and results, cheap enough for the application's thread.

`uuid.uuid4()` reads `os.urandom` for every id, and that system call releases the GIL: a
busy background thread then takes it and the application waits for it back (milliseconds
under load). A generator seeded once from `os.urandom`, and reseeded in forked children,
gives ids of the same quality for uniqueness without that switch.
"""

from __future__ import annotations

import os
import random

__all__ = ["new_hex_id", "new_uuid"]

_rng: random.Random | None = None


def _seed() -> int:
    # (an int: seeding with bytes imports hashlib on Python 3.13, which fails for a record
    # made while the interpreter tears down — in a __del__, say)
    return int.from_bytes(os.urandom(32), "big")


def _generator() -> random.Random:
    global _rng
    if _rng is None:
        _rng = random.Random(_seed())  # noqa: S311 - ids, not secrets
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_reseed)
    return _rng


def _reseed() -> None:
    if _rng is not None:
        _rng.seed(_seed())


def new_hex_id() -> str:
    """32 random hex digits."""
    return f"{_generator().getrandbits(128):032x}"


_VERSION_MASK = ~(0xF000 << 64) & ~(0xC000 << 48)
_VERSION_BITS = (0x4000 << 64) | (0x8000 << 48)


def new_uuid() -> str:
    """A random (version 4, RFC 4122 variant) UUID in its usual text form."""
    h = f"{(_generator().getrandbits(128) & _VERSION_MASK) | _VERSION_BITS:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
