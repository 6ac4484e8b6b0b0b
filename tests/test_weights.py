"""Loading weights offline in every format the field uses, for a CLIP that is not ViT-B/16."""


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
    with pytest.raises(WeightsError, match=r"refused|Cannot read"):
        load_clip(path)


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
