"""The model layer: image and text encoders other than the open_clip CLIP backbone (DINO, SAM, OFA, ...).

Each module builds a model from a config, loads its released weights safely (no pickled code) and exposes the
dense primitives the methods use. Nothing here imports from the method, pipeline or interface layers.
"""
