"""Reading model weights safely and getting them from the hubs: one place for every model of the library.

* :func:`read_state_dict`: a checkpoint file (safetensors, a tensor-only pickle read with ``weights_only=True``, or a
  TorchScript archive unpacked as data by a restricted unpickler) as a flat state dict. Nothing from a checkpoint is
  ever executed.
* :func:`fetch_hub_file`: a file of a Hugging Face repository (or an official download URL) from the local caches,
  else downloaded once; with no network and no cache it fails at once with instructions, not after retries.
* :func:`state_fingerprint`: a content hash of named tensors, to key caches of a model's outputs.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from vocabseg.errors import UsageError

log = logging.getLogger(__name__)

_META_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightsError(UsageError):
    """The requested weights cannot be found or read; the message says what to do."""


def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder, as users see it in messages."""
    return os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def fetch_hub_file(repo: str, filenames: Sequence[str], help_text: str, cache_dir: str | None = None,
                   url: str | None = None) -> Path:
    """Local path of the first of ``filenames`` in Hugging Face repository ``repo`` (or of ``url``, an official
    download kept in torch hub's checkpoint folder): a cached copy first, then a download.

    ``help_text`` says how to supply the file by hand; it is the message of the :class:`WeightsError` raised when
    nothing can be found offline or downloaded.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    official = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url) if url else None
    if official is not None and official.is_file():
        return official
    for filename in filenames:
        cached = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(cached, str):
            return Path(cached)
    if offline():
        raise WeightsError(help_text + "\n  (HF_HUB_OFFLINE is set, so nothing was downloaded.)")
    unreachable = hub_unreachable()
    if unreachable:
        raise WeightsError(help_text + f"\n  (No connection: {unreachable}.)")
    errors = []
    for filename in filenames:
        try:
            log.info("downloading %s/%s", repo, filename)
            return Path(hf_hub_download(repo, filename, cache_dir=cache_dir, etag_timeout=10))
        except Exception as exc:  # network errors come in many types; report them all
            errors.append(f"{repo}/{filename}: {_first_line(exc)}")
    if official is not None:
        try:
            log.info("downloading %s", url)
            official.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(official), progress=False)
            return official
        except Exception as exc:
            errors.append(f"{url}: {_first_line(exc)}")
    raise WeightsError(help_text + "\n  Download errors: " + "; ".join(errors))


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def hub_unreachable(timeout: float = 5.0) -> str | None:
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
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights (SAM 2: {"model": ...})
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
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
