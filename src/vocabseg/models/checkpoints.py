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
import re
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


def missing_weights_help(what: str, tag: str, download: str, role: str) -> str:
    """The message for tagged weights neither cached nor downloadable: where the caches are, or which file to pass
    as the model of ``role``."""
    return (f"Could not get the {what} weights '{tag}'.\n"
            f"  - On a machine with internet they download once to the Hugging Face cache ({hub_cache_dir()}) or "
            f"torch hub's checkpoint folder ({Path(torch.hub.get_dir()) / 'checkpoints'}); copy that cache here, or\n"
            f"  - download {download} and pass its path (--model {role}=PATH; Python: models={{'{role}': PATH}}).")


def _holds_code(path: Path, name: str) -> WeightsError:
    return WeightsError(f"{path} holds code ({name}), not only tensors: it will not be loaded; save a plain state "
                        "dict (torch.save(model.state_dict())) or a .safetensors file")


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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
    """Read a checkpoint file into a flat state dict without executing any code from it.

    A file that cannot be read this way raises a one-line :class:`WeightsError`: not a checkpoint, empty, a pickle
    that holds code, or a zip archive whose entries declare more bytes than the file can hold (checked before
    anything is inflated).
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty: not a checkpoint")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    elif zipfile.is_zipfile(path):
        state = _read_zip(path)
    else:
        state = _torch_load(path)
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights (SAM 2: {"model": ...})
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path} holds no state dict of tensors.")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in _META_KEYS and isinstance(v, torch.Tensor)}


def read_training_checkpoint(path: str | os.PathLike, format: str, what: str, command: str,
                             error: type[WeightsError] = WeightsError) -> dict:
    """The plain dict a ``vocabseg <command>`` trainer saved at ``path`` (its ``"format"`` entry is ``format``), read
    with ``weights_only=True``; ``what`` names it in the messages, raised as ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} not found; train one with `vocabseg {command}`.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"{path} is not a readable {what} ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != format:
        raise error(f"{path} is not an {what} written by `vocabseg {command}`")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type, OSError or ValueError
        raise WeightsError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from exc


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``, its errors as one line; torch's hint to retry with
    ``weights_only=False`` is never repeated: a file that needs it holds code and is not loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise _holds_code(path, refused.group(1)) from None
        detail = str(exc).partition("WeightsUnpickler error:")[2]
        reason = next((line.strip() for line in detail.splitlines() if line.strip()), "not a tensor pickle")
        raise WeightsError(f"{path} is not a tensor checkpoint this library can read ({reason})") from None
    except Exception as exc:
        raise WeightsError(f"Cannot read checkpoint {path}: {_first_line(exc)}") from exc


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


# --- Zip checkpoints (torch.save's format and TorchScript archives), checked before anything is inflated -----------

#: Uncompressed bytes a zip checkpoint may declare in all, as a multiple of its size on disk plus a margin: torch
#: stores entries uncompressed and tensors deflate little, so only a zip bomb declares more.
ZIP_EXPANSION = 4
ZIP_MARGIN = 16 << 20
#: Largest pickle entry (``data.pkl``): OpenAI's ViT-L/14 module tree takes about 100 KB.
MAX_PICKLE_BYTES = 16 << 20
#: Most pickle opcodes (so objects) a TorchScript pickle may hold, and the deepest nesting of its module tree.
MAX_PICKLE_OPS = 1_000_000
MAX_TREE_DEPTH = 64


def _read_zip(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_sizes(archive, path.stat().st_size, path)
            if _is_torchscript(archive):
                return _read_torchscript(archive, path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise WeightsError(f"{path} is not a readable zip archive ({_first_line(exc)})") from exc
    return _torch_load(path)


def check_zip_sizes(archive: zipfile.ZipFile, file_bytes: int, what: os.PathLike | str) -> None:
    """Refuse an archive whose entries declare more uncompressed bytes than its file can plausibly hold (each pickle
    at most :data:`MAX_PICKLE_BYTES`, all entries together at most :data:`ZIP_EXPANSION` times the file plus
    :data:`ZIP_MARGIN`), from its directory alone: nothing is inflated, and zipfile never inflates an entry past the
    size it declares."""
    limit = ZIP_EXPANSION * file_bytes + ZIP_MARGIN
    total = 0
    for info in archive.infolist():
        cap = MAX_PICKLE_BYTES if info.filename.endswith(".pkl") else limit
        if info.file_size > cap:
            raise WeightsError(f"{what}: entry {info.filename} declares {info.file_size:,} bytes uncompressed, more "
                               f"than the {cap:,} allowed for a {file_bytes:,}-byte file; refused before inflating")
        total += info.file_size
    if total > limit:
        raise WeightsError(f"{what}: its entries declare {total:,} bytes uncompressed, more than the {limit:,} "
                           f"allowed for a {file_bytes:,}-byte file; refused before inflating")


# --- TorchScript archives, read as data -------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    return any(name.split("/", 1)[-1].startswith("code/__torch__") for name in archive.namelist())


class _ScriptObject:
    """Stand-in for a TorchScript module: keeps the attribute dict, runs nothing."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _RefusedGlobal(pickle.UnpicklingError):
    """A class or function the pickle names that is not part of a module tree of tensors (the message: its name)."""


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles an archive's module tree as data: modules become :class:`_ScriptObject`, storages are read from the
    archive's ``data/`` entries (each exactly the bytes its tensor needs); any other class is refused."""

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
        raise _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise pickle.UnpicklingError(f"entry {name} is missing") from None
        needed = numel * dtype.itemsize
        if info.file_size != needed:
            raise pickle.UnpicklingError(f"entry {name} holds {info.file_size:,} bytes, its tensor {needed:,}")
        data = bytearray(self.archive.read(info))
        if not data:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype)


def _read_torchscript(archive: zipfile.ZipFile, path: Path) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive, by walking its pickled attribute tree (opcode count and
    tree depth bounded, so a hostile pickle fails with a :class:`WeightsError`)."""
    import io

    pkl = next((n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1), None)
    if pkl is None:
        raise WeightsError(f"{path} is a TorchScript archive without data.pkl; not a model file")
    data = archive.read(pkl)
    try:
        _check_pickle_ops(data)
        root = _TorchScriptUnpickler(io.BytesIO(data), archive, pkl[: -len("data.pkl")]).load()
    except _RefusedGlobal as exc:
        raise _holds_code(path, str(exc)) from None
    except Exception as exc:  # a malformed pickle fails in many ways; all mean the same to the user
        raise WeightsError(f"{path} is not a readable TorchScript archive ({_first_line(exc)})") from None
    return _tensors_of_tree(root, path)


def _check_pickle_ops(data: bytes) -> None:
    """Count the pickle's opcodes before running it: each makes at most one object."""
    import pickletools

    for count, _ in enumerate(pickletools.genops(data), 1):
        if count > MAX_PICKLE_OPS:
            raise pickle.UnpicklingError(f"its pickle holds more than {MAX_PICKLE_OPS:,} operations")


def _tensors_of_tree(root, path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a module tree by dotted name, walked without recursion; a tree deeper than
    :data:`MAX_TREE_DEPTH` (or cyclic) or with more than :data:`MAX_PICKLE_OPS` paths is refused."""
    state: dict[str, torch.Tensor] = {}
    stack, visits = [(root, "", 0)], 0
    while stack:
        obj, name, depth = stack.pop()
        visits += 1
        if depth > MAX_TREE_DEPTH or visits > MAX_PICKLE_OPS:
            raise WeightsError(f"{path}: its module tree is nested deeper than {MAX_TREE_DEPTH} levels, cyclic or "
                               f"larger than {MAX_PICKLE_OPS:,} paths; not a model file")
        if isinstance(obj, torch.Tensor):
            state[name] = obj
        elif isinstance(obj, _ScriptObject):
            attributes = getattr(obj, "state", {})  # a module the pickle never filled in has none
            children = [(value, f"{name}.{key}" if name else str(key), depth + 1) for key, value in attributes.items()]
            stack.extend(reversed(children))
    return state
