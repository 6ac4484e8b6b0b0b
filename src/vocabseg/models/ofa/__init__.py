"""OFA (Wang et al. 2022) in plain PyTorch, with IFSeg's segmentation decoder (Yun et al. 2023).

* :mod:`.config`: :class:`OFAConfig`, the released sizes :data:`OFA_SIZES`, sizes read off a checkpoint.
* :mod:`.model`: :class:`OFA` (ResNet stem, unified encoder, IFSeg decoder), fairseq parameter names.
* :mod:`.weights`: :func:`load_ofa` for fairseq / Hugging Face / vocabseg checkpoints and hub ids, read safely.
* :mod:`.bpe`: :class:`OFATokenizer` (GPT-2 byte-level BPE + fairseq dictionary).
"""

from vocabseg.models.ofa.bpe import OFATokenizer, find_bpe_files
from vocabseg.models.ofa.config import OFA_SIZES, OFAConfig, config_from_state_dict
from vocabseg.models.ofa.model import OFA, EncoderOutput
from vocabseg.models.ofa.weights import DEFAULT_OFA_WEIGHTS, LoadedOFA, OFAWeightsError, load_ofa

__all__ = ["DEFAULT_OFA_WEIGHTS", "OFA", "OFA_SIZES", "EncoderOutput", "LoadedOFA", "OFAConfig", "OFATokenizer",
           "OFAWeightsError", "config_from_state_dict", "find_bpe_files", "load_ofa"]
