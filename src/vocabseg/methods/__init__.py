"""Segmentation methods; importing this package registers the built-in ones."""

from vocabseg.methods import cliptrase, floss, ifseg, itaclip, maft, resclip, training_free  # noqa: F401
from vocabseg.methods.base import METHODS, Method, Preset, Protocol, create_method, register

__all__ = ["METHODS", "Method", "Preset", "Protocol", "create_method", "register"]
