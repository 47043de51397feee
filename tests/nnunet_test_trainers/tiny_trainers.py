"""Trainers shortened for tests: 1 epoch of a few iterations (found through nnUNet_extTrainer; see conftest.py)."""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_voxshield.trainers import (nnUNetTrainerEM, nnUNetTrainerUMed, nnUNetTrainerVoxShield,
                                         nnUNetTrainerVoxShieldEOT)


class Tiny:
    """Mixin: 1 epoch of ``iterations`` training and 1 validation iterations."""
    iterations = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, self.iterations, 1


class nnUNetTrainer_tiny(Tiny, nnUNetTrainer): pass
class nnUNetTrainerVoxShield_tiny(Tiny, nnUNetTrainerVoxShield): iterations = 4      # 2 surrogate + 2 generator
class nnUNetTrainerEM_tiny(Tiny, nnUNetTrainerEM): pass
class nnUNetTrainerUMed_tiny(Tiny, nnUNetTrainerUMed): iterations = 5                # 1 surrogate + 4 generator
class nnUNetTrainerVoxShieldEOT_tiny(Tiny, nnUNetTrainerVoxShieldEOT): pass         # 1 surrogate + 1 generator
