"""Segmentation methods; importing this package registers the built-in ones."""

from vocabseg.methods.base import METHODS, Method, Preset, Protocol, create_method, register
from vocabseg.methods.cass import method as _cass  # noqa: F401
from vocabseg.methods.cliptrase import method as _cliptrase  # noqa: F401
from vocabseg.methods.corrclip import method as _corrclip  # noqa: F401
from vocabseg.methods.floss import method as _floss  # noqa: F401
from vocabseg.methods.ifseg import clip_method as _ifseg_clip  # noqa: F401
from vocabseg.methods.ifseg import method as _ifseg  # noqa: F401
from vocabseg.methods.itaclip import method as _itaclip  # noqa: F401
from vocabseg.methods.last_block import method as _last_block  # noqa: F401
from vocabseg.methods.maft import method as _maft  # noqa: F401
from vocabseg.methods.pearl import method as _pearl  # noqa: F401
from vocabseg.methods.proxyclip import method as _proxyclip  # noqa: F401
from vocabseg.methods.resclip import method as _resclip  # noqa: F401
from vocabseg.methods.scclip import method as _scclip  # noqa: F401
from vocabseg.methods.scclip import sfp as _sfp  # noqa: F401
from vocabseg.methods.trident import method as _trident  # noqa: F401

__all__ = ["METHODS", "Method", "Preset", "Protocol", "create_method", "register"]
