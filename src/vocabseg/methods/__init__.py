"""Segmentation methods: the recipe interface (:mod:`.base`), the registry (:mod:`.registry`), one package per
method family."""
