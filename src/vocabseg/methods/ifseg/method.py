"""IFSeg (Yun et al. 2023) as the paper built it: OFA-Base, category words as the classifier, kNN smoothing.

The model is the method's ``ofa`` model: ``Segmenter("ifseg", models={"ofa": "run/ifseg.pt"})`` (``--model
ofa=run/ifseg.pt``, or ``--weights``, as OFA is the method's main model) segments with a checkpoint of ``vocabseg train
ifseg``; OFA weights (default ``ofa-base``) give the untrained OFA (the paper's "OFA" baseline row). The older
``checkpoint=`` option still names the same model (deprecated). Every query name is a category word (one word per class
reproduces the official code exactly; synonyms become extra categories whose probabilities are maxed per class). The
whole image is one pass at short side 512 (``protocol.short_side``), the logits and the kNN-smoothed probabilities are
upsampled to the original size, and the label map is the argmax of the upsampled probabilities (``knn=False``: of the
softmax of the upsampled logits times ``logit_scale``, 1 in the presets: the official "raw" prediction).

With a checkpoint trained on the same words as the query names, the prompt lists them in the checkpoint's order
(the order the model was trained with, as the official code evaluates), whatever order the classes are given in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from vocabseg.methods import presets as preset_data
from vocabseg.methods.base import Method, ModelSlot
from vocabseg.methods.ifseg.knn import DEFAULT_ITERS, DEFAULT_K
from vocabseg.methods.ifseg.ofa import category_prompt, grid_to_image, knn_probabilities, preprocess, segmentation_pass
from vocabseg.methods.registry import register
from vocabseg.models.encoder import Models
from vocabseg.models.ofa import OFATokenizer, find_bpe_files
from vocabseg.models.ofa.weights import DEFAULT_OFA_WEIGHTS, LoadedOFA
from vocabseg.pipeline import postprocess, timing, windows
from vocabseg.pipeline.protocol import Protocol
from vocabseg.pipeline.run import Dense, Prepared
from vocabseg.text.classes import ClassSpec
from vocabseg.text.classifier import TextCache, TextClassifier


@functools.lru_cache(maxsize=8)
def bpe_tokenizer(folders: tuple[str, ...]) -> OFATokenizer:
    """OFA's tokenizer from the first of ``folders`` holding the BPE files (else the Hugging Face cache)."""
    return OFATokenizer.from_folder(find_bpe_files(list(folders)))


@dataclass
class CategoryClassifier(TextClassifier):
    """Category embeddings ``(Q, D)`` (mean BPE embeddings of the query names) and the prompt ``L``."""

    prompt: torch.Tensor | None = None


@register
@dataclass
class IFSegOFA(Method):
    name: ClassVar[str] = "ifseg"
    summary: ClassVar[str] = ("IFSeg: OFA encoder-decoder trained on artificial word maps, kNN smoothing "
                              "(Yun et al. 2023; `vocabseg train ifseg`)")
    models: ClassVar = {"ofa": ModelSlot(
        "ofa", DEFAULT_OFA_WEIGHTS, "OFA with IFSeg's decoder: a checkpoint of `vocabseg train ifseg`, or OFA weights "
        "(the untrained baseline)", option="checkpoint")}
    default_protocol: ClassVar[Protocol] = preset_data.default_protocol(__package__, "ifseg")
    presets: ClassVar = preset_data.presets(__package__, "ifseg")

    knn: bool = True
    knn_k: int = DEFAULT_K
    knn_iters: int = DEFAULT_ITERS
    bpe_dir: str = ""

    def tokenizer(self, ofa: LoadedOFA) -> OFATokenizer:
        """The BPE files from ``bpe_dir``, next to the weights, where training found them, or the Hugging Face
        cache."""
        return bpe_tokenizer(tuple([self.bpe_dir] if self.bpe_dir else []) + tuple(ofa.bpe_folders()))

    def text_classifier(self, models: Models, spec: ClassSpec, cache: TextCache | None) -> CategoryClassifier:
        """Category embeddings of the query names; the prompt in the checkpoint's word order when it was trained on
        these words, else in the given order."""
        ofa: LoadedOFA = models.ofa
        tokenizer = self.tokenizer(ofa)
        queries = list(spec.queries)
        categories = category_prompt(tokenizer, queries)
        trained = ofa.trained_words
        order = list(trained) if trained and sorted(trained) == sorted(queries) else queries
        with torch.inference_mode():
            embeddings = ofa.model.embed_words(list(categories.word_tokens))
        query_class = torch.tensor(spec.query_class, dtype=torch.long, device=embeddings.device)
        return CategoryClassifier(spec, embeddings, query_class, category_prompt(tokenizer, order).tokens)

    def prepare(self, models: Models, image: torch.Tensor, protocol: Protocol, image_id: str | None = None
                ) -> Prepared:
        """The official evaluation resize (short side, long side at most ``max_long_side``) and ``[-1, 1]``."""
        short = protocol.short_side or min(image.shape[:2])
        inputs = preprocess(image, short, protocol.max_long_side).to(image.device)
        return Prepared(image=image, input=inputs, image_id=image_id)

    def dense(self, models: Models, inputs: list[Prepared], classifier: CategoryClassifier, protocol: Protocol
              ) -> list[Dense]:
        """One whole-image pass per image (images of the same input size share it): grid logits ``Q,h,w``, and with
        kNN the smoothed probabilities upsampled to the output size and maxed per class as the scores."""
        model = models.ofa.model
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, prepared in enumerate(inputs):
            by_shape.setdefault(tuple(prepared.input.shape), []).append(index)
        out: list[Dense | None] = [None] * len(inputs)
        for indices in by_shape.values():
            images = torch.cat([inputs[i].input for i in indices])
            with timing.stage("vit"), windows.autocast(protocol.precision, images.device):
                seg = segmentation_pass(model, images, classifier.prompt, classifier.embeddings)
            for row, index in enumerate(indices):
                out[index] = self.image_dense(seg.logits[row:row + 1], seg.features[row:row + 1], seg.grid,
                                              inputs[index].size, classifier)
        return out

    def image_dense(self, logits: torch.Tensor, features: torch.Tensor, grid: tuple[int, int],
                    size: tuple[int, int], classifier: CategoryClassifier) -> Dense:
        """One image's :class:`Dense` from its token logits ``1,h*w,Q`` and ResNet features ``1,h*w,D``."""
        grid_logits = logits[0].T.reshape(-1, *grid)
        if not (self.knn and self.knn_iters):
            return Dense(grid_logits)
        with timing.stage("postprocess"):
            probs = knn_probabilities(logits, features, self.knn_k, self.knn_iters)
        with timing.stage("upsample"):
            probs = grid_to_image(probs, grid, size)[0]
        spec = classifier.spec
        return Dense(grid_logits, scores=postprocess.max_over_names(probs, classifier.query_class, spec.num_classes))
