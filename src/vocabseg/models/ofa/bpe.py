"""OFA's text tokenisation: GPT-2 byte-level BPE (the ``tokenizers`` library), then fairseq's dictionary remap.

Two layouts of the same vocabulary are read:

* fairseq / OFA (``utils/BPE``): ``encoder.json`` + ``vocab.bpe`` give GPT-2 ids; ``dict.txt`` lists GPT-2 ids in
  dictionary order, so the dictionary index of GPT-2 id ``g`` is ``4 + `` its line (after ``<s> <pad> </s> <unk>``);
  ids absent from it become ``<unk>``.
* Hugging Face (``OFA-Sys/ofa-base``, BART's files): ``vocab.json`` already maps tokens to dictionary indices;
  ``merges.txt`` are the same merges.

Every file may be gzipped (``.gz``). :func:`find_bpe_files` looks next to the weights and then in the Hugging Face
cache (downloading ``vocab.json``/``merges.txt`` of ``OFA-Sys/ofa-base`` once when online).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path

from vocabseg.models.checkpoints import WeightsError

BOS, PAD, EOS, UNK = 0, 1, 2, 3
FAIRSEQ_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
HF_FILES = ("vocab.json", "merges.txt")
HF_BPE_REPO = "OFA-Sys/ofa-base"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def _existing(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class OFATokenizer:
    """Text -> OFA dictionary indices. ``encode_word(' dining table')`` -> ``[7824, 2103]``."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], remap: dict[int, int] | None = None):
        from tokenizers import Tokenizer, models, pre_tokenizers

        self._tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._remap = remap

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> OFATokenizer:
        """Read the fairseq files (``encoder.json``, ``vocab.bpe``, ``dict.txt``) or the Hugging Face ones
        (``vocab.json``, ``merges.txt``) from ``folder``, gzipped or not."""
        folder = Path(folder)
        fairseq = [_existing(folder, name) for name in FAIRSEQ_FILES]
        hf = [_existing(folder, name) for name in HF_FILES]
        if all(fairseq):
            encoder, merges_file, dictionary = fairseq
            remap = {}
            for line, entry in enumerate(_read_text(dictionary).splitlines()):
                token = entry.rsplit(" ", 1)[0]
                if token.isdigit():
                    remap[int(token)] = 4 + line
            return cls(json.loads(_read_text(encoder)), _merges(_read_text(merges_file)), remap)
        if all(hf):
            vocab, merges_file = hf
            return cls(json.loads(_read_text(vocab)), _merges(_read_text(merges_file)))
        raise WeightsError(f"no OFA BPE files in {folder}: expected {', '.join(FAIRSEQ_FILES)} (OFA's "
                                f"utils/BPE) or {', '.join(HF_FILES)} (Hugging Face), optionally gzipped")

    def encode_word(self, text: str) -> list[int]:
        """Dictionary indices of the byte-level BPE of ``text`` (no BOS/EOS; spaces are part of the tokens)."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if self._remap is None:
            return ids
        return [self._remap.get(i, UNK) for i in ids]

    def encode_words(self, text: str) -> list[int]:
        """Each whitespace-separated word of ``text`` encoded as ``' ' + word``, concatenated (OFA's prompts)."""
        return [i for word in text.split() for i in self.encode_word(" " + word)]

    def tokens(self, text: str) -> list[str]:
        """The BPE token strings of ``text`` (``Ġ`` marks a leading space), for display."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens


def _merges(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        if line and not line.startswith("#version"):
            left, right = line.split(" ")
            pairs.append((left, right))
    return pairs


def find_bpe_files(near: Sequence[str | os.PathLike] = (), cache_dir: str | None = None) -> Path:
    """A folder with OFA's BPE files: the first of ``near`` (and its ``bpe``/``BPE`` sub-folders) that holds them,
    else the Hugging Face cache of ``OFA-Sys/ofa-base`` (downloaded when online)."""
    for folder in near:
        folder = Path(folder)
        for candidate in (folder, folder / "bpe", folder / "BPE"):
            if all(_existing(candidate, n) for n in FAIRSEQ_FILES) or all(_existing(candidate, n) for n in HF_FILES):
                return candidate
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    paths = [try_to_load_from_cache(HF_BPE_REPO, name, cache_dir=cache_dir) for name in HF_FILES]
    if all(isinstance(p, str) for p in paths):
        return Path(paths[0]).parent
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    help_text = (f"OFA's BPE files were not found. Put encoder.json, vocab.bpe and dict.txt (OFA's utils/BPE folder) "
                 f"or vocab.json and merges.txt (the Hugging Face repo {HF_BPE_REPO}) next to the weights or pass "
                 f"bpe_dir=FOLDER (--option bpe_dir=FOLDER)")
    if offline:
        raise WeightsError(help_text + " (HF_HUB_OFFLINE is set, so nothing was downloaded).")
    try:
        paths = [hf_hub_download(HF_BPE_REPO, name, cache_dir=cache_dir, etag_timeout=10) for name in HF_FILES]
    except Exception as exc:  # network errors come in many types
        raise WeightsError(f"{help_text} (download failed: {type(exc).__name__}: {exc}).") from None
    return Path(paths[0]).parent
