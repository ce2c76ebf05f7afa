"""Torch-only layers shared by the methods (no detectron2 import): import them from their modules,
e.g. ``from d2_refine.layers.deq import ...``."""
