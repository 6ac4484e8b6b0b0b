"""Base of the methods that run a DINO helper model next to CLIP (ProxyCLIP, CorrCLIP, CASS).

The helper is a method option, ``dino`` (a tag such as ``dino_vitb8`` or a checkpoint file, see
:mod:`vocabseg.models.dino`), loaded once per process and device and shared by every method that names the same
weights. Its identity goes into the run description (:meth:`Method.helper_models`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vocabseg.methods.base import Method, Protocol
from vocabseg.models.dino import DinoEncoder, load_dino
from vocabseg.pipeline import inference


@dataclass
class DinoMethod(Method):
    """A method with a DINO helper model (option ``dino``: tag or checkpoint path)."""

    dino: str = "dino_vitb8"

    def dino_encoder(self, backbone) -> DinoEncoder:
        """The helper DINO on the CLIP backbone's device."""
        return load_dino(str(self.dino), str(backbone.device))

    def helper_models(self, backbone) -> dict[str, dict[str, str]]:
        encoder = self.dino_encoder(backbone)
        return {"dino": {"arch": encoder.name, "source": encoder.source}}

    def windows_per_pass(self, backbone, protocol: Protocol, image_side: int) -> int:
        """The automatic choice bounded by the DINO's tokens as well (a ViT-B/8 has 4x CLIP-B/16's per crop)."""
        if protocol.window_batch:
            return protocol.window_batch
        crop = protocol.crop or image_side
        return min(super().windows_per_pass(backbone, protocol, image_side),
                   inference.auto_window_batch(self.dino_encoder(backbone), crop))
