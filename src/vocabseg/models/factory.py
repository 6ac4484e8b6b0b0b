"""Resolve and load CLIP weights safely: open_clip tags, local files, OpenAI JIT archives.

Every path ends in :func:`load_clip`, which returns an ``open_clip`` ``CLIP`` model in eval mode.

* ``weights="openai"`` (default) builds ``ViT-B-16`` with QuickGELU and the OpenAI weights, taken from the
  Hugging Face cache or downloaded through ``huggingface_hub`` (cached).
* Any other open_clip pretrained tag works the same way (``arch="ViT-L-14", weights="laion2b_s32b_b82k"``).
* A local file loads offline: an OpenAI JIT archive (``ViT-B-16.pt``), a plain state dict (``.pt``/``.pth``/``.bin``)
  or safetensors. Without ``arch`` the architecture is inferred from the tensor shapes (OpenAI layout, QuickGELU);
  with ``arch`` the file is loaded into that open_clip config (e.g. ``ViT-B-16`` for GELU-trained LAION weights).

Nothing here executes code from a checkpoint: pickles are read with ``weights_only=True`` and JIT archives are
unpacked by a restricted unpickler that only rebuilds tensors.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_ARCH = "ViT-B-16"
DEFAULT_WEIGHTS = "openai"
_META_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightsError(RuntimeError):
    """The requested weights cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from (recorded in every output's sidecar)."""

    arch: str
    source: str


def load_clip(
    weights: str | os.PathLike = DEFAULT_WEIGHTS,
    arch: str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
):
    """Build an open_clip CLIP model from a pretrained tag or a local checkpoint file.

    Returns ``(model, WeightsInfo)``. Raises :class:`WeightsError` with instructions when the weights are missing.
    """
    import open_clip

    path = Path(os.path.expanduser(str(weights)))
    if path.exists():
        state_dict = read_state_dict(path)
        if arch is None:
            model = build_from_state_dict(state_dict)
            arch = describe_arch(model)
        else:
            model = open_clip.create_model(arch, pretrained=None)
            try:
                model.load_state_dict(state_dict)
            except RuntimeError as exc:
                raise WeightsError(f"{path} does not fit the open_clip architecture {arch!r}: "
                                   f"{str(exc).splitlines()[0]}") from exc
        info = WeightsInfo(arch=arch, source=str(path.resolve()))
    else:
        if _looks_like_path(str(weights)):
            raise WeightsError(f"Weights file not found: {weights}. Pass an existing checkpoint file (--weights PATH).")
        arch = arch or DEFAULT_ARCH
        name = _open_clip_name(arch, str(weights))
        file = _fetch_pretrained(name, str(weights), cache_dir)
        model = open_clip.create_model(name, pretrained=None)
        model.load_state_dict(read_state_dict(file))
        info = WeightsInfo(arch=name, source=f"{name}:{weights}")
    return model.float().eval().to(device), info


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _open_clip_name(arch: str, tag: str) -> str:
    """OpenAI weights need the QuickGELU variant; plain 'ViT-B-16' silently builds GELU."""
    if tag == "openai" and not arch.endswith("-quickgelu"):
        return f"{arch}-quickgelu"
    return arch


def _fetch_pretrained(name: str, tag: str, cache_dir: str | None) -> Path:
    """Local path of an open_clip pretrained checkpoint: the HF cache first, then a download."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(t for n, t in open_clip.list_pretrained() if n == name) or "none"
        raise WeightsError(f"Unknown pretrained weights '{tag}' for {name}. Known tags: {known}. "
                           "Or pass a local checkpoint file with --weights PATH.")
    hub_id = cfg.get("hf_hub", "").rstrip("/")
    help_text = (
        f"Could not get the weights '{tag}' for {name}.\n"
        f"  - On a machine with internet they download once to the Hugging Face cache "
        f"({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}); copy that cache here, or\n"
        f"  - download the OpenAI ViT-B/16 archive (ViT-B-16.pt) or a state dict / safetensors file and pass "
        f"--weights PATH (Python: weights=PATH)."
    )
    if not hub_id:
        raise WeightsError(help_text)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    filenames = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    for filename in filenames:
        cached = try_to_load_from_cache(hub_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise WeightsError(help_text + "\n  (HF_HUB_OFFLINE is set, so nothing was downloaded.)")
    unreachable = _hub_unreachable()
    if unreachable:
        raise WeightsError(help_text + f"\n  (No connection: {unreachable}.)")
    errors = []
    for filename in filenames:
        try:
            log.info("downloading %s/%s", hub_id, filename)
            return Path(hf_hub_download(hub_id, filename, cache_dir=cache_dir, etag_timeout=10))
        except Exception as exc:  # network errors come in many types; report them all
            errors.append(f"{filename}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise WeightsError(help_text + "\n  Download errors: " + "; ".join(errors))


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face endpoint cannot be reached, or None; checked before downloading so that a machine
    without network fails at once instead of after huggingface_hub's retries. Skipped behind a proxy."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port}: {exc}"
    return None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict without executing any code from it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif zipfile.is_zipfile(path) and _is_torchscript(path):
        state = _read_torchscript(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsError(f"{path} is not a plain tensor checkpoint (refused to unpickle code): {exc}") from exc
        except Exception as exc:
            raise WeightsError(f"Cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path} holds no state dict of tensors.")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in _META_KEYS and isinstance(v, torch.Tensor)}


def state_fingerprint(tensors) -> str:
    """A content hash of named tensors ``(name, tensor)`` (strided samples of each, in name order), to key caches of
    a model's outputs."""
    import hashlib
    import math

    digest = hashlib.sha256()
    for name, tensor in sorted(tensors):
        flat = tensor.detach().reshape(-1).float().cpu()
        step = max(1, math.ceil(flat.numel() / 4096))
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat[::step].numpy().tobytes())
    return digest.hexdigest()[:24]


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """open_clip ``CLIP`` keyword arguments inferred from OpenAI-layout tensor shapes (heads = width // 64)."""
    if "visual.proj" not in state_dict or "visual.conv1.weight" not in state_dict:
        raise WeightsError("The checkpoint is not a CLIP ViT in OpenAI/open_clip layout "
                           "(no 'visual.proj' / 'visual.conv1.weight'). Pass --arch for other layouts.")

    def count_blocks(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

    conv = state_dict["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        vision_cfg=dict(layers=count_blocks("visual.transformer.resblocks."), width=width, patch_size=patch,
                        image_size=patch * grid, head_width=64),
        text_cfg=dict(context_length=state_dict["positional_embedding"].shape[0],
                      vocab_size=state_dict["token_embedding.weight"].shape[0], width=text_width,
                      heads=max(1, text_width // 64), layers=count_blocks("transformer.resblocks.")),
        quick_gelu=True,
    )


def build_from_state_dict(state_dict: dict[str, torch.Tensor]):
    """Build a float32 CLIP whose architecture is inferred from the tensor shapes, and load the weights."""
    from open_clip.model import CLIP

    model = CLIP(**infer_config(state_dict))
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    except RuntimeError as exc:
        raise WeightsError(f"The checkpoint does not match the inferred CLIP ViT architecture: {exc}") from exc
    return model


def describe_arch(model) -> str:
    """A readable architecture name such as 'ViT-B/16-w768-l12' inferred from a built model."""
    v = model.visual
    patch = v.conv1.kernel_size[0]
    return f"ViT-p{patch}-w{v.conv1.out_channels}-l{len(v.transformer.resblocks)}-g{v.grid_size[0]}"


# --- TorchScript archives, read as data -------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/__torch__") for name in archive.namelist())


class _ScriptObject:
    """Stand-in for a TorchScript module: keeps the attribute dict, runs nothing."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        if not data:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype)[:numel]


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive, by walking its pickled attribute tree."""
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1)
        prefix = pkl[: -len("data.pkl")]
        import io

        root = _TorchScriptUnpickler(io.BytesIO(archive.read(pkl)), archive, prefix).load()
    state: dict[str, torch.Tensor] = {}

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            state[name] = obj.clone()
        elif isinstance(obj, _ScriptObject):
            for key, value in obj.state.items():
                walk(value, f"{name}.{key}" if name else key)

    walk(root, "")
    return state
