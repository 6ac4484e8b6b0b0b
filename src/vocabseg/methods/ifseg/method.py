"""IFSeg (Yun et al. 2023) as the paper built it: OFA-Base, category words as the classifier, kNN smoothing.

``Segmenter("ifseg", checkpoint="run/ifseg.pt")`` segments with a model from ``vocabseg train ifseg``;
``weights=`` (default ``ofa-base``) without a checkpoint gives the untrained OFA (the paper's "OFA" baseline row).
Every query name is a category word (one word per class reproduces the official code exactly; synonyms become
extra categories whose probabilities are maxed per class). The whole image is one pass at short side 512
(``protocol.short_side``), the logits and the kNN-smoothed probabilities are upsampled to the original size, and the
label map is the argmax of the upsampled probabilities (``knn=False``: of the upsampled logits, the official "raw"
prediction).

With a checkpoint trained on the same words as the query names, the prompt lists them in the checkpoint's order
(the order the model was trained with, as the official code evaluates), whatever order the classes are given in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from vocabseg.methods.base import Method, Preset, Protocol, register
from vocabseg.methods.ifseg.knn import DEFAULT_ITERS, DEFAULT_K
from vocabseg.methods.ifseg.ofa import category_prompt, grid_to_image, knn_probabilities, preprocess, segmentation_pass
from vocabseg.pipeline import inference, postprocess, timing
from vocabseg.text.classifier import TextClassifier


@dataclass
class OFABackbone:
    """The loaded OFA model with its tokenizer (what :class:`~vocabseg.api.Segmenter` keeps as ``backbone``)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    trained_words: tuple[str, ...] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


@dataclass
class CategoryClassifier(TextClassifier):
    """Category embeddings ``(Q, D)`` (mean BPE embeddings of the query names) and the prompt ``L``."""

    prompt: torch.Tensor | None = None


_PROTOCOL = Protocol(short_side=512, max_long_side=2048, crop=0, logit_scale=1.0)


@register
@dataclass
class IFSegOFA(Method):
    name: ClassVar[str] = "ifseg"
    summary: ClassVar[str] = ("IFSeg: OFA encoder-decoder trained on artificial word maps, kNN smoothing "
                              "(Yun et al. 2023; `vocabseg train ifseg`)")
    default_protocol: ClassVar[Protocol] = _PROTOCOL
    default_weights: ClassVar[str] = "ofa-base"
    backbone_kind: ClassVar[str] = "ofa"
    presets: ClassVar[dict[str, Preset]] = {
        dataset: Preset(_PROTOCOL, dataset, "ifseg")
        for dataset in ("coco-stuff-unseen15", "ade150", "coco-stuff", "coco-stuff27")
    }

    checkpoint: str | None = None
    knn: bool = True
    knn_k: int = DEFAULT_K
    knn_iters: int = DEFAULT_ITERS
    bpe_dir: str = ""

    def load_backbone(self, weights, arch, device) -> OFABackbone:
        """OFA from the trained ``checkpoint`` when given, else from ``weights``; the BPE files from ``bpe_dir``,
        next to the weights, or the Hugging Face cache."""
        from vocabseg.models.ofa import OFATokenizer, find_bpe_files, load_ofa
        from vocabseg.models.ofa.weights import CHECKPOINT_FORMAT

        if arch:
            raise ValueError("--arch does not apply to ifseg: the OFA size is read from the weights")
        loaded = load_ofa(self.checkpoint or weights, device)
        near = [self.bpe_dir] if self.bpe_dir else []
        stored = loaded.checkpoint.get("meta", {}).get("bpe_dir")
        near += [Path(loaded.source).parent, *([stored] if stored else [])]
        tokenizer = OFATokenizer.from_folder(find_bpe_files(near))
        trained = None
        if loaded.checkpoint.get("format") == CHECKPOINT_FORMAT:
            trained = tuple(loaded.checkpoint["words"])
        size = loaded.model.config
        name = f"ofa-d{size.embed_dim}-l{size.encoder_layers}+{size.decoder_layers}"
        return OFABackbone(loaded.model, tokenizer, name, loaded.source, trained)

    def build_classifier(self, backbone: OFABackbone, spec, cache) -> CategoryClassifier:
        queries = list(spec.queries)
        categories = category_prompt(backbone.tokenizer, queries)
        order = queries
        if backbone.trained_words and sorted(backbone.trained_words) == sorted(queries):
            order = list(backbone.trained_words)
        with torch.inference_mode():
            embeddings = backbone.model.embed_words(list(categories.word_tokens))
        query_class = torch.tensor(spec.query_class, dtype=torch.long, device=embeddings.device)
        return CategoryClassifier(spec, embeddings, query_class, category_prompt(backbone.tokenizer, order).tokens)

    @torch.inference_mode()
    def predict(self, backbone: OFABackbone, image: torch.Tensor, classifier: CategoryClassifier,
                protocol: Protocol) -> dict:
        height, width = image.shape[:2]
        with timing.stage("preprocess"):
            short = protocol.short_side or min(height, width)
            x = preprocess(image, short, protocol.max_long_side).to(backbone.device)
        with timing.stage("vit"), inference.autocast(protocol.precision, backbone.device):
            seg = segmentation_pass(backbone.model, x, classifier.prompt, classifier.embeddings)
        with timing.stage("upsample"):
            logits = grid_to_image(seg.logits, seg.grid, (height, width))[0]
        if self.knn and self.knn_iters:
            with timing.stage("postprocess"):
                probs = knn_probabilities(seg.logits, seg.features, self.knn_k, self.knn_iters)
            with timing.stage("upsample"):
                probs = grid_to_image(probs, seg.grid, (height, width))[0]
        else:
            probs = torch.softmax(logits, dim=0)
        spec = classifier.spec
        scores = postprocess.max_over_names(probs, classifier.query_class, spec.num_classes)
        labels = postprocess.labels_from_scores(scores, protocol.prob_thd, protocol.area_thd, spec.has_background)
        return {"logits": logits, "scores": scores, "labels": labels}
