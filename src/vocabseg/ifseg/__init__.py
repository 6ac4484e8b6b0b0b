"""Image-free segmentation (IFSeg, Yun et al. 2023): artificial word maps, kNN smoothing, the CLIP-based head.

The pieces here are model-agnostic where they can be (sampler, kNN smoothing, protocols) so that an OFA-based
port can reuse them; :mod:`vocabseg.ifseg.model` and :mod:`vocabseg.ifseg.train` hold the CLIP-based variant.
"""
