"""Victim profiles shortened for tests: 1 epoch of a few iterations (``Tiny`` from tiny_trainers.py)."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from tiny_trainers import Tiny

from nnunetv2_voxshield.trainers import nnUNetTrainerLabelAware


class nnUNetTrainerLabelAware_tiny(Tiny, nnUNetTrainerLabelAware): pass


class nnUNetTrainer_tinyFailsOnProtected(Tiny, nnUNetTrainer):
    """Fails at the start of training on a dataset whose name contains 'protected' (one job of a DAG fails)."""

    def on_train_start(self):
        if 'protected' in self.plans_manager.dataset_name.lower():
            raise RuntimeError(f'{self.plans_manager.dataset_name}: this test trainer refuses protected data')
        super().on_train_start()
