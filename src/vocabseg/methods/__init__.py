"""Segmentation methods; importing this package registers the built-in ones."""

from vocabseg.methods import (  # noqa: F401
    cass,
    cliptrase,
    corrclip,
    floss,
    ifseg,
    ifseg_ofa,
    itaclip,
    maft,
    pearl,
    proxyclip,
    resclip,
    scclip,
    sfp,
    training_free,
    trident,
)
from vocabseg.methods.base import METHODS, Method, Preset, Protocol, create_method, register

__all__ = ["METHODS", "Method", "Preset", "Protocol", "create_method", "register"]
