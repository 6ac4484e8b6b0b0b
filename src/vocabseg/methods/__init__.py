"""Segmentation methods; importing this package registers the built-in ones."""

from vocabseg.methods import (  # noqa: F401
    cliptrase,
    ifseg,
    ifseg_ofa,
    itaclip,
    maft,
    pearl,
    scclip,
    sfp,
    training_free,
)
from vocabseg.methods.base import METHODS, Method, Preset, Protocol, create_method, register

__all__ = ["METHODS", "Method", "Preset", "Protocol", "create_method", "register"]
