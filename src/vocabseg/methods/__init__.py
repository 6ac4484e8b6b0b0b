"""Segmentation methods; importing this package registers the built-in ones."""

from vocabseg.methods import (  # noqa: F401
    cass,
    cliptrase,
    corrclip,
    ifseg,
    itaclip,
    maft,
    proxyclip,
    training_free,
    trident,
)
from vocabseg.methods.base import METHODS, Method, Preset, Protocol, create_method, register

__all__ = ["METHODS", "Method", "Preset", "Protocol", "create_method", "register"]
