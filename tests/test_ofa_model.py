"""OFA in the model layer on tiny random configurations: sizes, causal decoding, position tables on non-square grids,
both checkpoint layouts written here, safe unpickling, refusal of Chinese checkpoints."""

import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from vocabseg.models.ofa import OFA, OFA_SIZES, OFAConfig, OFAWeightsError, load_ofa
from vocabseg.models.ofa.weights import hf_to_fairseq

TINY = OFAConfig(embed_dim=16, ffn_dim=32, heads=2, encoder_layers=2, decoder_layers=2, resnet_layers=(1, 1, 1),
                 vocab_rows=59457, dropout=0.0, encoder_drop_path=0.0, decoder_drop_path=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model(seed: int = 0) -> OFA:
    model = OFA(TINY)
    generator = torch.Generator().manual_seed(seed)
    model.init_weights(generator)
    with torch.no_grad():  # non-zero relative tables and LayerNorms, so that every path matters
        for name, parameter in model.named_parameters():
            if "rel_pos_table" in name or "layer_norm" in name or name.endswith("ln.weight"):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _inputs(grid=(3, 5), batch=1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([[0, 99, 16, 5, 621, 2353, 2]] * batch)
    return tokens, torch.randn(batch, grid[0] * grid[1], TINY.embed_dim, generator=generator), grid


@pytest.mark.parametrize("size, millions", [("tiny", 33), ("medium", 93), ("base", 180), ("large", 470),
                                            ("huge", 930)])
def test_released_sizes_build_with_their_parameter_counts(size, millions):
    with torch.device("meta"):
        model = OFA(OFA_SIZES[size])
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.03, count


def test_decoder_self_attention_is_causal():
    """Output p depends on decoder inputs 0..p only: perturbing inputs after p leaves outputs up to p unchanged."""
    model = _tiny_model()
    tokens, image, grid = _inputs()
    encoder = model.encoder(tokens, image, grid)
    cut = 6

    def perturb(module, args):
        x = args[0].clone()
        x[:, cut + 1:] += 3.0 * torch.randn(x[:, cut + 1:].shape, generator=torch.Generator().manual_seed(2))
        return (x, *args[1:])

    with torch.no_grad():
        reference = model.decoder(encoder)
        hook = model.decoder.layers[0].register_forward_pre_hook(perturb)
        perturbed = model.decoder(encoder)
        hook.remove()
    assert torch.equal(perturbed[:, :cut + 1], reference[:, :cut + 1])
    assert (perturbed[:, cut + 1:] - reference[:, cut + 1:]).abs().max() > 1e-3


def test_seg_position_table_is_resized_rows_then_columns_for_non_square_grids():
    """A table linear in (row, col) stays linear under bilinear resizing: value = a*src_row + b*src_col with the
    align_corners=False source coordinates of each axis (a transposed or shifted resize fails this)."""
    model = _tiny_model()
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    with torch.no_grad():
        table = model.decoder.embed_seg_positions.weight
        table[1:] = (3.0 * rows.flatten() + 0.5 * cols.flatten())[:, None]
        table[0] = -7.0
    grid = (16, 24)
    resized = model.decoder.seg_positions(grid)
    assert resized.shape == (1 + 16 * 24, TINY.embed_dim)
    assert torch.equal(resized[0], table[0])
    i, j = torch.meshgrid(torch.arange(16.0), torch.arange(24.0), indexing="ij")
    expected = 3.0 * ((i + 0.5) * 2 - 0.5) + 0.5 * ((j + 0.5) * 32 / 24 - 0.5)
    torch.testing.assert_close(resized[1:, 0], expected.flatten(), rtol=0, atol=1e-4)
    assert torch.equal(model.decoder.seg_positions((32, 32)), table)


def test_seg_relative_bias_keeps_its_bos_row_and_column():
    model = _tiny_model()
    base = model.decoder.seg_rel_bias(0, (32, 32))
    resized = model.decoder.seg_rel_bias(0, (16, 24))
    assert resized.shape == (TINY.heads, 1 + 16 * 24, 1 + 16 * 24)
    assert torch.equal(resized[:, 0, 0], base[:, 0, 0])
    torch.testing.assert_close(resized[:, 0, 1:], base[:, 0, 1:2].expand(-1, 16 * 24))  # constant row stays so
    torch.testing.assert_close(resized[:, 1:, 0], base[:, 1:2, 0].expand(-1, 16 * 24))


def test_image_positions_lookup_small_grids_and_resize_large_ones():
    encoder = _tiny_model().encoder
    table = encoder.embed_image_positions.weight
    small = encoder.image_positions((16, 24))
    ids = torch.arange(24)[None] + torch.arange(16)[:, None] * 42 + 1
    assert torch.equal(small, table[ids.flatten()])  # the top-left corner of the 42-wide table, not a resize
    wide = encoder.image_positions((8, 48))  # 384 cells: a lookup whose columns past 42 alias into the next row
    assert torch.equal(wide[42], table[1 + 42])
    large = encoder.image_positions((32, 43))
    block = table[(torch.arange(32)[None] + torch.arange(32)[:, None] * 42 + 1).flatten()]
    expected = F.interpolate(block.T.reshape(1, -1, 32, 32), size=(32, 43), mode="bilinear", align_corners=False)
    torch.testing.assert_close(large, expected[0].flatten(1).T)


def test_forward_runs_on_non_square_grids_and_batches():
    model = _tiny_model()
    tokens, image, grid = _inputs(grid=(5, 9), batch=2)
    with torch.no_grad():
        decoded, encoder = model(tokens, image, grid)
        single, _ = model(tokens[:1], image[:1], grid)
    assert decoded.shape == (2, 1 + 45, TINY.embed_dim) and encoder.hidden.shape == (2, 45 + 7, TINY.embed_dim)
    torch.testing.assert_close(decoded[:1], single, rtol=1e-5, atol=1e-5)


def _fairseq_layout(model: OFA) -> dict:
    """The key layout of OFA's ofa_base.pt: BatchNorm counters, index buffers, the output projection, no IFSeg keys."""
    state = {k: v.clone() for k, v in model.state_dict().items()
             if not k.startswith(("decoder.embed_seg_positions", "decoder.seg_pos_ln", "decoder.seg_rel_pos"))}
    for name in [k for k in state if k.endswith("running_var")]:
        state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"]
    state["encoder.token_rp_bucket"] = model.encoder.token_rp_bucket.clone()
    state["encoder.version"] = torch.tensor([3.0])
    return state


def _to_hf(key: str) -> str:
    for fairseq, hf in ((".attn_ln.", ".self_attn_mid_layer_norm."), (".self_attn_ln.", ".self_attn_mid_layer_norm."),
                        (".cross_attn_ln.", ".cross_attn_mid_layer_norm."), (".ffn_layernorm.", ".ffn_layer_norm."),
                        (".encoder_attn_layer_norm.", ".cross_attn_layer_norm."), (".encoder_attn.", ".cross_attn.")):
        key = key.replace(fairseq, hf)
    return "model." + key


def test_loads_a_fairseq_checkpoint_with_pickled_arguments(tmp_path):
    model = _tiny_model()
    path = tmp_path / "ofa_tiny.pt"
    args = argparse.Namespace(arch="ofa_tiny", bpe="gpt2", encoder_embed_dim=16)
    torch.save({"args": args, "cfg": None, "model": _fairseq_layout(model), "extra_state": {"epoch": 3}}, path)
    with pytest.raises(Exception):  # noqa: B017  (not loadable as plain data: the restricted reader is needed)
        torch.load(path, weights_only=True)
    loaded = load_ofa(path, dropout=0.0, encoder_drop_path=0.0, decoder_drop_path=0.0)
    assert loaded.checkpoint["args"].state["arch"] == "ofa_tiny"  # inert data, not an argparse object
    ours = loaded.model.state_dict()
    for name, value in model.state_dict().items():
        if "seg" in name:
            continue
        assert torch.equal(ours[name], value), name
    seg = ours["decoder.embed_seg_positions.weight"]  # IFSeg's new table: N(0, 0.02) as init_bert_params
    assert abs(float(seg.std()) - 0.02) < 0.003 and not torch.equal(seg, model.decoder.embed_seg_positions.weight)
    tokens, image, grid = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encoder(tokens, image, grid).hidden,
                                   model.encoder(tokens, image, grid).hidden)


def test_loads_the_hugging_face_layout_from_a_folder(tmp_path):
    model = _tiny_model(seed=3)
    assert hf_to_fairseq("model.decoder.layers.1.cross_attn.k_proj.weight") == (
        "decoder.layers.1.encoder_attn.k_proj.weight")
    assert hf_to_fairseq("encoder.layers.0.self_attn_mid_layer_norm.bias") == "encoder.layers.0.attn_ln.bias"
    state = {_to_hf(k): v for k, v in model.state_dict().items()}
    assert any("cross_attn_mid_layer_norm" in k for k in state)
    state["model.shared.weight"] = state.pop("model.encoder.embed_tokens.weight")  # one tied embedding, BART-style
    del state["model.decoder.embed_tokens.weight"]
    folder = tmp_path / "ofa-tiny"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    loaded = load_ofa(folder, dropout=0.0, encoder_drop_path=0.0, decoder_drop_path=0.0).model
    tokens, image, grid = _inputs(grid=(4, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, image, grid)[0], model(tokens, image, grid)[0])


class _Payload:
    """Pickles as a call of ``os.system``: a checkpoint that runs a command when unpickled naively."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"args": _Payload(marker), "model": _fairseq_layout(_tiny_model())}, path)
    loaded = load_ofa(path)
    assert not marker.exists()
    assert type(loaded.checkpoint["args"]).__name__ == "system" and loaded.checkpoint["args"].args == (
        f"touch {marker}",)
    torch.save({"model": {"encoder.embed_tokens.weight": _Payload(marker)}}, path)
    with pytest.raises(OFAWeightsError):
        load_ofa(path)
    assert not marker.exists()


def test_chinese_checkpoints_are_refused_clearly(tmp_path):
    small_vocab = OFA(TINY.replace(vocab_rows=21128 + 9193))
    path = tmp_path / "ofa_cn_base.pt"
    torch.save({"args": argparse.Namespace(bpe="bert"), "model": _fairseq_layout(small_vocab)}, path)
    with pytest.raises(OFAWeightsError, match="Chinese OFA checkpoint"):
        load_ofa(path)
    english_rows_bert_args = tmp_path / "bert_args.pt"
    torch.save({"args": argparse.Namespace(bpe="bert"), "model": _fairseq_layout(_tiny_model())},
               english_rows_bert_args)
    with pytest.raises(OFAWeightsError, match="Chinese"):
        load_ofa(english_rows_bert_args)
    omegaconf_style = tmp_path / "cfg.pt"  # fairseq's hydra config: cfg.bpe._name
    torch.save({"cfg": {"bpe": {"_name": "bert"}, "model": {"arch": "ofa_base"}},
                "model": _fairseq_layout(_tiny_model())}, omegaconf_style)
    with pytest.raises(OFAWeightsError, match="Chinese"):
        load_ofa(omegaconf_style)


def test_missing_weights_give_the_offline_help(tmp_path):
    with pytest.raises(OFAWeightsError, match="not found"):
        load_ofa(tmp_path / "nowhere" / "ofa_base.pt")
    with pytest.raises(OFAWeightsError, match="HF_HUB_OFFLINE"):
        load_ofa("ofa-base")
