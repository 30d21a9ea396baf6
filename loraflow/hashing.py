"""One content hash for everything loraflow versions: spec sections, training runs, published models.

Values are hashed as canonical JSON (sorted keys, no spaces, non-ASCII kept), so equal content gives
an equal hash on every machine and Python version, whatever order a dict was built in. Files and
folders are hashed by their bytes elsewhere (`loraflow.artifacts`); this is for structured content.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

DEFAULT_LENGTH = 16
"""Hex digits kept: 64 bits, far from collisions among one project's versions, short enough to read."""


def canonical_json(value: Any) -> str:
    """`value` as the JSON text that is hashed: sorted keys, compact separators, paths as strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(value: Any, length: int = DEFAULT_LENGTH) -> str:
    """The first `length` hex digits of the sha256 of `value`'s canonical JSON."""
    if not 1 <= length <= 64:
        raise ValueError(f"a sha256 hex digest has 1 to 64 digits, not {length}")
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:length]
