"""Artificial word maps: grid sizes, nearest upsampling, hierarchical words, seeding, hierarchy files."""

import pytest
import torch

from vocabseg.data.classes import CLASSES, COARSE_27
from vocabseg.methods.ifseg.sampler import (
    WordSet,
    coco_stuff_hierarchy,
    read_hierarchy,
    sample_cells,
    sample_maps,
    upsample_nearest,
)

FLAT = WordSet.build([["cat"], ["dog", "puppy"], ["sky"]])


def test_grid_sizes_cover_one_to_s():
    gen = torch.Generator().manual_seed(0)
    sizes = [tuple(sample_cells(FLAT, gen, max_cells=32)[0].shape) for _ in range(3000)]
    assert {u for u, _ in sizes} == set(range(1, 33))
    assert {v for _, v in sizes} == set(range(1, 33))


def test_upsampled_map_matches_the_cells():
    cells = torch.arange(12).reshape(3, 4)
    up = upsample_nearest(cells, (7, 10))
    # hand-computed nearest rule: row i takes cell floor(i * 3 / 7), column j cell floor(j * 4 / 10)
    rows = [0, 0, 0, 1, 1, 2, 2]
    cols = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert up.tolist() == [[int(cells[r, c]) for c in cols] for r in rows]
    # an exact multiple gives constant blocks
    assert torch.equal(upsample_nearest(cells, (6, 8)), cells.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_sample_maps_agree_with_their_cells_and_words():
    gen = torch.Generator().manual_seed(3)
    classes, words = sample_maps(FLAT, 64, (16, 16), gen, max_cells=32)
    assert classes.shape == words.shape == (64, 16, 16)
    word_class = torch.tensor(FLAT.word_class)
    assert torch.equal(word_class[words], classes)  # the ground truth is the map of the words' classes
    assert set(classes.unique().tolist()) == {0, 1, 2}
    assert set(words.unique().tolist()) == {0, 1, 2, 3}  # both dog words occur
    # the same draw through sample_cells + upsample_nearest
    gen = torch.Generator().manual_seed(3)
    cells, cell_words = sample_cells(FLAT, gen, 32)
    assert torch.equal(upsample_nearest(cells, (16, 16)), classes[0])
    assert torch.equal(upsample_nearest(cell_words, (16, 16)), words[0])


def test_classes_uniform_then_words_uniform():
    words = WordSet.build([["a"], ["b", "c", "d"]])
    classes, chosen = sample_maps(words, 200, (8, 8), torch.Generator().manual_seed(1), max_cells=8)
    share_b = (classes == 1).float().mean().item()
    assert abs(share_b - 0.5) < 0.05  # the class with three words is not drawn three times as often
    inside = chosen[classes == 1]
    for w in (1, 2, 3):
        assert abs((inside == w).float().mean().item() - 1 / 3) < 0.05


def test_hierarchical_sampling_yields_only_words_of_the_coarse_class():
    hierarchy = coco_stuff_hierarchy()
    words = WordSet.build([[c] for c in COARSE_27], COARSE_27, hierarchy)
    assert len(words.words) == 27 + 171 - 1  # "person" is both a coarse and a fine name
    classes, chosen = sample_maps(words, 32, (16, 16), torch.Generator().manual_seed(0), max_cells=32)
    for c, w in zip(classes.flatten().tolist(), chosen.flatten().tolist(), strict=True):
        assert words.words[w] in (COARSE_27[c], *hierarchy[COARSE_27[c]])
    fine = set(CLASSES["coco-stuff"])
    assert sum(words.words[w] in fine for w in chosen.unique().tolist()) > 100


def test_same_seed_same_maps():
    a = sample_maps(FLAT, 8, (12, 12), torch.Generator().manual_seed(7))
    b = sample_maps(FLAT, 8, (12, 12), torch.Generator().manual_seed(7))
    c = sample_maps(FLAT, 8, (12, 12), torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_hierarchy_file(tmp_path):
    path = tmp_path / "h.txt"
    path.write_text("# coarse: fine\nanimal: cat, dog\n\nplant: tree,grass  # trailing comment\n")
    assert read_hierarchy(path) == {"animal": ("cat", "dog"), "plant": ("tree", "grass")}
    words = WordSet.build([["animal", "beast"], ["plant"], ["sky"]], ["animal", "plant", "sky"], read_hierarchy(path))
    assert words.words == ("animal", "beast", "cat", "dog", "plant", "tree", "grass", "sky")
    assert words.word_class == (0, 0, 0, 0, 1, 1, 1, 2)
    assert read_hierarchy("coco-stuff")["sky"] == ("clouds", "sky-other")


def test_hierarchy_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("animal cat dog\n")
    with pytest.raises(ValueError, match="expected 'class: word"):
        read_hierarchy(bad)
    with pytest.raises(ValueError, match="neither a file"):
        read_hierarchy(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="not in the class list"):
        WordSet.build([["cat"]], ["cat"], {"vehicle": ("car",)})
