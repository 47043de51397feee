"""The label-conditioned trainer shortened for tests (``Tiny`` from tiny_trainers.py): 1 epoch of 6 iterations, the
surrogate re-initialised every 4, so one reset happens inside the run."""
from tiny_trainers import Tiny

from nnunetv2_voxshield.trainers import nnUNetTrainerVoxShieldLC


class nnUNetTrainerVoxShieldLC_tiny(Tiny, nnUNetTrainerVoxShieldLC):
    iterations = 6
    surrogate_reset_every = 4
