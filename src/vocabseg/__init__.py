"""vocabseg: segment any image into any list of words with training-free and fine-tuned CLIP methods."""

from vocabseg.api import Segmentation, Segmenter
from vocabseg.text.classifier import ClassSpec, parse_classes

__all__ = ["ClassSpec", "Segmentation", "Segmenter", "parse_classes"]
__version__ = "0.1.0"
