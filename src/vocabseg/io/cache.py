"""Where vocabseg keeps what it computes once and reuses (text embeddings, automatic masks)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The cache folder of ``kind``: ``$VOCABSEG_CACHE/<kind>`` (default ``~/.cache/vocabseg/<kind>``, following
    ``XDG_CACHE_HOME``)."""
    root = os.environ.get("VOCABSEG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vocabseg")
    return Path(root) / kind
