"""vocabseg: segment any image into any list of words.

>>> from vocabseg import Segmenter                                     # doctest: +SKIP
>>> out = Segmenter("sclip").segment("photo.jpg", classes=["cat", "dog"])  # doctest: +SKIP

The public names are imported on first use, so that ``import vocabseg`` (and ``vocabseg --help``) stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ClassSpec", "Segmentation", "Segmenter", "list_methods", "parse_classes"]
__version__ = "0.1.0"

_HOMES = {"Segmentation": "vocabseg.api", "Segmenter": "vocabseg.api", "list_methods": "vocabseg.api",
          "ClassSpec": "vocabseg.text.classes", "parse_classes": "vocabseg.text.classes"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'vocabseg' has no attribute {name!r}")
