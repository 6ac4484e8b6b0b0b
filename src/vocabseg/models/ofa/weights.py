"""Load OFA / IFSeg weights without executing pickled code.

Accepted sources (``weights``):

* a fairseq checkpoint such as OFA's ``ofa_base.pt`` (``ckpt["model"]``, official parameter names). These pickle
  ``argparse.Namespace`` / omegaconf objects next to the tensors; they are read by a restricted unpickler that
  rebuilds tensors and plain containers and turns every other object into inert data (nothing is imported or run);
* a Hugging Face ``OFA-Sys/ofa-*`` ``pytorch_model.bin`` (OFA's transformers fork: ``self_attn_mid_layer_norm``,
  ``cross_attn`` ... mapped to the fairseq names), a plain state dict, safetensors, or a folder holding one;
* a checkpoint written by ``vocabseg train ifseg`` (the whole model, fairseq names);
* a hub id: ``ofa-base`` (= ``OFA-Sys/ofa-base``), ``ofa-large``, ... downloaded once into the Hugging Face cache.

The Chinese OFA checkpoints (OFA-CN, a BERT vocabulary) are refused with a clear message: IFSeg's category words
are English BPE tokens, and loading them by mistake is what gives mIoU ~0 (alinlab/ifseg issue #5).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from vocabseg.models.checkpoints import WeightsError
from vocabseg.models.ofa.config import UNSHAPED_FIELDS, OFAConfig, config_from_state_dict
from vocabseg.models.ofa.model import IFSEG_KEYS, IGNORED_KEYS, OFA

log = logging.getLogger(__name__)

#: Format tag of the checkpoints ``vocabseg train ifseg`` writes for OFA.
CHECKPOINT_FORMAT = "vocabseg-ifseg-ofa/1"
DEFAULT_OFA_WEIGHTS = "ofa-base"
HUB_FILES = ("pytorch_model.bin", "model.safetensors")
#: Fewest token-embedding rows of an English OFA: the GPT-2 dictionary (50264 entries) plus ``<mask>``.
ENGLISH_TEXT_ROWS = 50265


class OFAWeightsError(WeightsError):
    """The OFA weights cannot be found, read or used; the message says what to do."""


# --- restricted unpickling -------------------------------------------------------------------------------------

class InertObject:
    """Stand-in for any pickled object other than a tensor or a plain container: keeps its class name, the
    arguments it was built with and its state; runs nothing."""

    module = qualname = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.module}.{self.qualname}>"


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data, *unused):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` zip archive: tensors and containers are rebuilt, everything else is inert."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.inert: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        key = (module, name)
        if key not in self.inert:
            self.inert[key] = type(name, (InertObject,), {"module": module, "qualname": name})
        return self.inert[key]

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected storage record {pid!r}")
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            self.storages[key] = torch.frombuffer(data, dtype=dtype)[:numel] if data else torch.empty(0, dtype=dtype)
        return self.storages[key]


def read_checkpoint(path: str | os.PathLike):
    """The object saved in ``path`` with tensors rebuilt and nothing executed: ``torch.load(weights_only=True)``
    for plain files, safetensors, and the restricted unpickler for archives that pickle other objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as exc:
        raise OFAWeightsError(f"cannot read {path}: {exc}") from exc
    if not zipfile.is_zipfile(path):
        raise OFAWeightsError(f"{path} pickles objects other than tensors in the legacy (pre-1.6) torch format, "
                              f"which is not read; re-save it with a recent torch")
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1), None)
        if pkl is None:
            raise OFAWeightsError(f"{path} is not a torch checkpoint (no data.pkl)")
        prefix = pkl[: -len("data.pkl")]
        try:
            return _RestrictedUnpickler(io.BytesIO(archive.read(pkl)), archive, prefix).load()
        except (pickle.UnpicklingError, TypeError, AttributeError) as exc:
            raise OFAWeightsError(f"refused to read {path}: it pickles something other than data ({exc})") from None


# --- key layouts ----------------------------------------------------------------------------------------------

_HF_LAYER_NAMES = {
    "encoder": {"self_attn_mid_layer_norm": "attn_ln", "ffn_layer_norm": "ffn_layernorm"},
    "decoder": {"self_attn_mid_layer_norm": "self_attn_ln", "cross_attn_mid_layer_norm": "cross_attn_ln",
                "cross_attn_layer_norm": "encoder_attn_layer_norm", "cross_attn": "encoder_attn",
                "ffn_layer_norm": "ffn_layernorm"},
}
_LAYER_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.([^.]+)\.(.+)$")


def hf_to_fairseq(key: str) -> str:
    """A parameter name of OFA's Hugging Face fork -> the fairseq name (identity for names already fairseq's)."""
    key = key.removeprefix("model.")
    match = _LAYER_KEY.match(key)
    if match:
        side, index, module, rest = match.groups()
        module = _HF_LAYER_NAMES[side].get(module, module)
        key = f"{side}.layers.{index}.{module}.{rest}"
    return key


def _strings(obj, depth: int = 0):
    """Every string inside a checkpoint's (inert) argument objects."""
    if depth > 12:
        return
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, InertObject):
        yield from _strings(obj.state, depth + 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings(value, depth + 1)


def _strings_under(obj, key: str, depth: int = 0):
    """The strings stored under ``key`` anywhere in a checkpoint's arguments (``args.bpe``, omegaconf ``cfg.bpe``)."""
    if depth > 12:
        return
    if isinstance(obj, InertObject):
        obj = obj.state
    if isinstance(obj, dict):
        for k, value in obj.items():
            if k == key:
                yield from _strings(value)
            yield from _strings_under(value, key, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings_under(value, key, depth + 1)


def state_dict_of(checkpoint, source: str) -> dict[str, torch.Tensor]:
    """The fairseq-named float tensors of a read checkpoint (fairseq, Hugging Face, plain or vocabseg layout);
    refuses Chinese OFA checkpoints."""
    if not isinstance(checkpoint, dict):
        raise OFAWeightsError(f"{source} holds no state dict")
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise OFAWeightsError(f"{source}: its 'model' entry is not a state dict")
    state = {hf_to_fairseq(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    tied = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "shared.weight")
    embed = next((state[k] for k in tied if k in state), None)
    if embed is None:
        raise OFAWeightsError(f"{source} is not an OFA checkpoint (no encoder.embed_tokens.weight)")
    state.pop("shared.weight", None)  # the tied token embedding under a third name (Hugging Face style)
    for key in tied[:2]:
        state.setdefault(key, embed)
    rows = state["encoder.embed_tokens.weight"].shape[0]
    bpe = {s.lower() for s in _strings_under({k: v for k, v in checkpoint.items() if k != "model"}, "bpe")}
    if rows < ENGLISH_TEXT_ROWS or "bert" in bpe:
        raise OFAWeightsError(
            f"{source} is a Chinese OFA checkpoint (OFA-CN: a BERT vocabulary, {rows} token rows), not the English "
            f"OFA IFSeg is built on; its category words would be looked up in the wrong vocabulary (mIoU ~0, "
            f"alinlab/ifseg issue #5). Use the English ofa_base.pt from OFA's checkpoints page or the Hugging Face "
            f"OFA-Sys/ofa-base weights.")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()
            if k not in IGNORED_KEYS and not k.endswith("num_batches_tracked")}


# --- finding and building ---------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LoadedOFA:
    """A built model and where it came from (the ``ofa`` model of a method); ``checkpoint`` is the whole read object
    (training state, the trained words...)."""

    model: OFA
    source: str
    checkpoint: dict

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def name(self) -> str:
        """The size read off the weights, e.g. ``ofa-d768-l6+6``."""
        size = self.model.config
        return f"ofa-d{size.embed_dim}-l{size.encoder_layers}+{size.decoder_layers}"

    @property
    def trained_words(self) -> tuple[str, ...] | None:
        """The category words a ``vocabseg train ifseg`` checkpoint was trained on, in its prompt order."""
        if self.checkpoint.get("format") != CHECKPOINT_FORMAT:
            return None
        return tuple(self.checkpoint["words"])

    def bpe_folders(self) -> list[str]:
        """Where the BPE files may lie: next to the weights, then the folder a training run recorded."""
        stored = self.checkpoint.get("meta", {}).get("bpe_dir")
        return [str(Path(self.source).parent), *([stored] if stored else [])]


def resolve_weights(weights: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local weights file: the path itself, a weights file inside a folder, or a hub download."""
    path = Path(os.path.expanduser(str(weights)))
    if path.is_file():
        return path
    if path.is_dir():
        for name in (*HUB_FILES, "ofa_base.pt", "checkpoint.pt"):
            if (path / name).is_file():
                return path / name
        candidates = sorted(path.glob("*.pt"))
        if len(candidates) == 1:
            return candidates[0]
        raise OFAWeightsError(f"no OFA weights file in {path} (expected pytorch_model.bin, model.safetensors or "
                              f"one .pt file)")
    text = str(weights)
    if (os.sep in text and not re.fullmatch(r"[\w.-]+/[\w.-]+", text)) or text.endswith((".pt", ".bin")):
        raise OFAWeightsError(f"OFA weights file not found: {weights}")
    repo = f"OFA-Sys/{text}" if "/" not in text else text
    return _download(repo, cache_dir)


def _download(repo: str, cache_dir: str | None) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for name in HUB_FILES:
        cached = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached)
    help_text = (f"Could not get the OFA weights {repo!r}.\n"
                 f"  - On a machine with internet they download once into the Hugging Face cache "
                 f"({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}); copy that cache here, or\n"
                 f"  - download OFA's English ofa_base.pt (OFA's checkpoints.md) and pass its path "
                 f"(--weights PATH, Python: weights=PATH).")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise OFAWeightsError(help_text + "\n  (HF_HUB_OFFLINE is set, so nothing was downloaded.)")
    errors = []
    for name in HUB_FILES:
        try:
            log.info("downloading %s/%s", repo, name)
            return Path(hf_hub_download(repo, name, cache_dir=cache_dir, etag_timeout=10))
        except Exception as exc:  # network errors come in many types; report them all
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise OFAWeightsError(help_text + "\n  Download errors: " + "; ".join(errors))


def build_ofa(state: dict[str, torch.Tensor], source: str, seed: int = 0, **options) -> OFA:
    """An :class:`OFA` shaped by ``state`` and loaded from it. IFSeg's tables missing from an OFA checkpoint are
    initialised N(0, 0.02) from ``seed`` (as the official ``init_bert_params``); anything else missing is an error."""
    config: OFAConfig = config_from_state_dict(state, **options)
    model = OFA(config)
    model.init_weights(torch.Generator().manual_seed(seed), only=IFSEG_KEYS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(IFSEG_KEYS)]
    if missing or unexpected:
        raise OFAWeightsError(f"{source} does not fit the OFA architecture read from its shapes: missing "
                              f"{missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval()


def load_ofa(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
             cache_dir: str | None = None, seed: int = 0, arch: str | None = None, **options) -> LoadedOFA:
    """Resolve, read (safely) and build OFA weights (``None``: :data:`DEFAULT_OFA_WEIGHTS`) on ``device``;
    ``options`` override :class:`OFAConfig` fields that shapes do not tell (dropout rates...). The size is read off
    the weights, so ``arch`` is refused."""
    if arch:
        raise OFAWeightsError(f"--arch {arch} does not apply to OFA: its size is read from the weights")
    path = resolve_weights(DEFAULT_OFA_WEIGHTS if weights is None else weights, cache_dir)
    checkpoint = read_checkpoint(path)
    if isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT:
        options = {**{k: checkpoint["config"][k] for k in UNSHAPED_FIELDS}, **options}
    model = build_ofa(state_dict_of(checkpoint, str(path)), str(path), seed, **options)
    return LoadedOFA(model.to(device), str(path.resolve()), checkpoint if isinstance(checkpoint, dict) else {})
