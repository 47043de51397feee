"""Short victims for benchmarks/audit_engine.py --source phantom: 6 epochs (or $VOXSHIELD_ENGINE_EPOCHS, set from the
benchmark's --epochs) of 3 iterations, checkpoint_latest.pth after every epoch (nnU-Net's default is every 50), so that a training killed in the middle resumes from its
checkpoint as a long one would; found through nnUNet_extTrainer."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA


class Short:
    """Mixin: ``epochs`` epochs of ``iterations`` training and 1 validation iterations, a checkpoint every epoch."""
    epochs, iterations = int(os.environ.get('VOXSHIELD_ENGINE_EPOCHS', 6)), 3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = self.epochs, \
            self.iterations, 1
        self.save_every = 1


class nnUNetTrainer_engine(Short, nnUNetTrainer): pass
class nnUNetTrainerNoDA_engine(Short, nnUNetTrainerNoDA): pass
