"""Loading weights offline in every format the field uses, for a CLIP that is not ViT-B/16, and refusing hostile or
broken files with one clear line."""

import struct
import zipfile
import zlib

import pytest
import torch
from conftest import make_tiny_clip

from vocabseg.models.checkpoints import WeightsError, read_state_dict
from vocabseg.models.openclip import load_clip

# patch 8, width 128 (2 heads), 2 layers, grid 6x6, embed 24, text width 64, context 40: not ViT-B/16 in any way
OTHER_SIZE = dict(
    embed_dim=24,
    vision_cfg=dict(image_size=48, layers=2, width=128, patch_size=8, head_width=64),
    text_cfg=dict(context_length=40, vocab_size=49408, width=64, heads=1, layers=1),
    quick_gelu=True,
)


@pytest.fixture(scope="module")
def other_model():
    return make_tiny_clip(seed=3, cfg=OTHER_SIZE)


def _assert_same_outputs(a, b):
    _assert_same_outputs_at(a, b, size=48, context=40)


def _assert_same_outputs_at(a, b, size, context):
    image = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(image), b.encode_image(image), atol=1e-5, rtol=1e-5)
        import open_clip

        tokens = open_clip.tokenize(["a photo of a cat.", "dog"], context_length=context)
        torch.testing.assert_close(a.encode_text(tokens), b.encode_text(tokens), atol=1e-5, rtol=1e-5)


def _state_dict_to_module(state):
    """A module tree whose state_dict keys are those of ``state`` (OpenAI-style, for scripting)."""
    root = torch.nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, value.clone())
    return root


class _Archive(torch.nn.Module):
    """Stand-in for OpenAI's traced CLIP: the tensors plus a forward, traced into a TorchScript archive."""

    def __init__(self, state):
        super().__init__()
        tree = _state_dict_to_module(state)
        for name, child in tree.named_children():
            self.add_module(name, child)
        for name, buffer in tree.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    def forward(self, x):
        return x @ self.text_projection


def test_openai_state_dict_of_another_size_loads_with_inferred_architecture(tmp_path, other_model):
    path = tmp_path / "clip.pt"
    torch.save(other_model.state_dict(), path)
    clip = load_clip(path)
    model = clip.text.model
    assert clip.name == "ViT-p8-w128-l2-g6"
    assert model.visual.transformer.resblocks[0].attn.num_heads == 2  # width // 64
    assert model.context_length == 40
    _assert_same_outputs(model, other_model)


def test_safetensors_and_wrapped_state_dicts_load(tmp_path, other_model):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in other_model.state_dict().items()}
    save_file(state, tmp_path / "clip.safetensors")
    model = load_clip(tmp_path / "clip.safetensors").text.model
    _assert_same_outputs(model, other_model)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    model = load_clip(tmp_path / "wrapped.pth").text.model
    _assert_same_outputs(model, other_model)


def test_jit_archive_is_read_without_running_it(tmp_path, other_model, monkeypatch):
    state = {k: v.half() if v.is_floating_point() else v for k, v in other_model.state_dict().items()}
    state["input_resolution"] = torch.tensor(48)
    archive = torch.jit.trace(_Archive(state), torch.randn(1, 64).half())
    path = tmp_path / "ViT-tiny.pt"
    archive.save(str(path))

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be used")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    read = read_state_dict(path)
    assert "input_resolution" not in read and read["visual.proj"].dtype == torch.float16
    model = load_clip(path).text.model
    half = make_tiny_clip(seed=3, cfg=OTHER_SIZE)
    half.load_state_dict({k: v.float() for k, v in state.items() if k != "input_resolution"})
    _assert_same_outputs(model, half)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": Evil()}, path)
    with pytest.raises(WeightsError, match=r"holds code \(print\), not only tensors: it will not be loaded") as error:
        load_clip(path)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_missing_file_and_missing_cache_fail_fast_with_instructions(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="not found"):
        load_clip(tmp_path / "nope" / "ViT-B-16.pt")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _forbid_downloads(monkeypatch)
    monkeypatch.setattr("socket.create_connection", _never_called)  # offline: not even a connection probe
    with pytest.raises(WeightsError, match="--weights PATH"):
        load_clip("openai", cache_dir=str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match="Unknown pretrained"):
        load_clip("no-such-tag")


def test_unreachable_hub_fails_at_once_without_offline_mode(tmp_path, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as probe:  # a local port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    _forbid_downloads(monkeypatch)  # the probe fails first: no download with its retries is attempted
    with pytest.raises(WeightsError, match="No connection"):
        load_clip("openai", cache_dir=str(tmp_path / "empty-cache"))


def _never_called(*args, **kwargs):
    raise AssertionError("the network must not be used here")


def _forbid_downloads(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _never_called)


def test_explicit_arch_loads_state_dict_into_that_config(tmp_path, tiny_model):
    torch.save(tiny_model.state_dict(), tmp_path / "tiny.bin")
    with pytest.raises(WeightsError, match="does not fit"):  # a ViT-B-16 config cannot take the tiny tensors
        load_clip(tmp_path / "tiny.bin", arch="ViT-B-16")


def test_tiny_weights_fixture_reloads_exactly(tiny_weights):
    from conftest import TINY_LOADABLE_CFG

    model = load_clip(tiny_weights).text.model
    _assert_same_outputs_at(model, make_tiny_clip(seed=1, cfg=TINY_LOADABLE_CFG), size=64, context=77)


# --- hostile and broken files: one clear WeightsError each, nothing inflated or run ------------------------------

def _text(value: str) -> bytes:
    """Pickle opcode BINUNICODE."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    """Pickle opcode BININT."""
    return b"J" + struct.pack("<i", value)


#: Pickle opcodes GLOBAL, EMPTY_TUPLE, NEWOBJ: a new TorchScript module object on the stack.
_NEW_MODULE = b"c__torch__.M\nModule\n)\x81"


def _module_pickle(attributes: dict[str, bytes]) -> bytes:
    """A protocol-2 pickle of one module whose attributes are given as opcodes, as TorchScript writes it."""
    items = b"".join(_text(key) + value + b"s" for key, value in attributes.items())
    return b"\x80\x02" + _NEW_MODULE + b"}" + items + b"b."


def _tensor_ops(key: str, numel: int) -> bytes:
    """``_rebuild_tensor_v2(<FloatStorage entry data/key of numel items>, 0, (numel,), (1,), False, {})``."""
    storage = b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text(key) + _text("cpu") + _int(numel) + b"tQ"
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _int(0) + _int(numel) + b"\x85" + _int(1) + b"\x85"
            + b"\x89}tR")


def _chain_pickle(depth: int) -> bytes:
    """Modules nested ``depth`` deep (each the ``child`` of the next), built bottom-up through the memo."""
    ops = [b"\x80\x02", _NEW_MODULE, b"}b", b"r" + struct.pack("<I", 0)]
    for level in range(1, depth + 1):
        ops += [b"0", _NEW_MODULE, b"}", _text("child"), b"j" + struct.pack("<I", level - 1), b"sb",
                b"r" + struct.pack("<I", level)]
    return b"".join(ops) + b"."


#: A module whose ``self`` attribute is the module itself.
_CYCLIC_PICKLE = b"\x80\x02" + _NEW_MODULE + b"r\0\0\0\0}" + _text("self") + b"j\0\0\0\0sb."


def _script_archive(path, data_pkl: bytes, entries: dict[str, bytes] | None = None, script: bool = True):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", data_pkl)
        if script:
            archive.writestr("model/code/__torch__/M.py", b"")
        for name, data in (entries or {}).items():
            archive.writestr(f"model/data/{name}", data)
    return path


class _RepeatingDeflate:
    """A deflate compressor for data made of one repeated chunk: the chunk is compressed once, ending in a full
    flush (so its blocks stand alone), and that output is reused: 1 GiB of zeros deflates in a moment."""

    def __init__(self):
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.blocks: dict[bytes, bytes] = {}

    def compress(self, data: bytes) -> bytes:
        if data not in self.blocks:
            self.blocks[data] = self.deflate.compress(data) + self.deflate.flush(zlib.Z_FULL_FLUSH)
        return self.blocks[data]

    def flush(self) -> bytes:
        return self.deflate.flush()


GIB = 1 << 30


@pytest.fixture(scope="module")
def zip_bombs(tmp_path_factory):
    """A ~1 MB TorchScript archive whose one tensor entry inflates to 1 GiB of zeros, and the same as a torch.save
    archive (no code entry)."""
    folder = tmp_path_factory.mktemp("bombs")
    paths = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zipfile, "_get_compressor", lambda *args, **kwargs: _RepeatingDeflate())
        for kind in ("script", "plain"):
            path = _script_archive(folder / f"{kind}.pt", _module_pickle({"weight": _tensor_ops("0", GIB // 4)}),
                                   script=kind == "script")
            with zipfile.ZipFile(path, "a") as archive:
                entry = zipfile.ZipInfo("model/data/0")
                entry.compress_type = zipfile.ZIP_DEFLATED
                chunk = bytes(16 << 20)
                with archive.open(entry, "w") as out:
                    for _ in range(GIB // len(chunk)):
                        out.write(chunk)
            paths[kind] = path
    return paths


def test_hand_built_archive_reads_its_tensor(tmp_path):
    values = torch.arange(6, dtype=torch.float32)
    path = _script_archive(tmp_path / "ok.pt", _module_pickle({"weight": _tensor_ops("0", 6)}),
                           {"0": values.numpy().tobytes()})
    torch.testing.assert_close(read_state_dict(path)["weight"], values)


@pytest.mark.parametrize("kind", ["script", "plain"])
def test_zip_bomb_is_refused_before_inflating(zip_bombs, kind, monkeypatch):
    path = zip_bombs[kind]
    with zipfile.ZipFile(path) as archive:
        entry = archive.getinfo("model/data/0")
    assert entry.file_size == GIB and path.stat().st_size < 2 << 20  # a real bomb: 1 GiB in about 1 MB
    opened = []
    original_open = zipfile.ZipFile.open

    def recording_open(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return original_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    monkeypatch.setattr(torch, "load", _never_called)
    with pytest.raises(WeightsError, match=r"declares 1,073,741,824 bytes uncompressed.*refused before inflating"):
        read_state_dict(path)
    assert "model/data/0" not in opened and "model/data.pkl" not in opened


def test_oversized_pickle_entry_is_refused(tmp_path):
    path = _script_archive(tmp_path / "big.pt", _module_pickle({"pad": _text("x" * (17 << 20))}))
    with pytest.raises(WeightsError, match=r"entry model/data.pkl declares .* refused before inflating"):
        read_state_dict(path)


@pytest.mark.parametrize("data_pkl, match", [
    (_chain_pickle(5000), "nested deeper than 64 levels"),
    (_CYCLIC_PICKLE, "nested deeper than 64 levels, cyclic"),
    (b"\x80\x02" + b"}" * 1_000_001 + b".", "more than 1,000,000 operations"),
    (_module_pickle({"weight": b"cos\nsystem\n" + _text("echo pwned") + b"\x85R"}), r"holds code \(os.system\)"),
    (_module_pickle({"weight": _tensor_ops("0", 1000)}), "entry model/data/0 is missing"),
    (b"\x80\x02garbage", "not a readable TorchScript archive"),
], ids=["5000-deep", "cyclic", "million-objects", "code", "missing-entry", "garbage"])
def test_hostile_torchscript_pickles_are_one_line_errors(tmp_path, data_pkl, match):
    path = _script_archive(tmp_path / "hostile.pt", data_pkl, {"1": bytes(8)})
    with pytest.raises(WeightsError, match=match) as error:
        read_state_dict(path)
    assert "\n" not in str(error.value)


def test_tensor_entry_of_the_wrong_size_is_refused(tmp_path):
    path = _script_archive(tmp_path / "short.pt", _module_pickle({"weight": _tensor_ops("0", 1000)}), {"0": bytes(8)})
    with pytest.raises(WeightsError, match="holds 8 bytes, its tensor 4,000"):
        read_state_dict(path)


@pytest.mark.parametrize("name, content, match", [
    ("random.safetensors", b"\x8f" * 4096, r"not a readable safetensors file \(.+\)"),
    ("empty.pt", b"", "is empty: not a checkpoint"),
    ("random.pt", bytes(range(256)) * 16, r"not a tensor checkpoint this library can read \(.+\)"),
    ("broken.pt", b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, 46, 0, 0), "not a readable zip archive"),
], ids=["random-safetensors", "empty", "random-pickle", "broken-zip"])
def test_unreadable_files_are_one_line_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=match) as error:
        read_state_dict(path)
    assert "\n" not in str(error.value) and not str(error.value).rstrip().endswith(":")
