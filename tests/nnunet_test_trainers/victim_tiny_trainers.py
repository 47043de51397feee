"""Victim profiles shortened for tests: 1 epoch of a few iterations (``Tiny`` from tiny_trainers.py)."""
from tiny_trainers import Tiny

from nnunetv2_voxshield.trainers import nnUNetTrainerLabelAware


class nnUNetTrainerLabelAware_tiny(Tiny, nnUNetTrainerLabelAware): pass
