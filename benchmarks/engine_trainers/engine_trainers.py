"""Short victims for benchmarks/audit_engine.py --source phantom: 6 epochs of 3 iterations (a training long enough
to be killed in the middle and resumed from checkpoint_latest.pth; found through nnUNet_extTrainer)."""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA


class Short:
    """Mixin: ``epochs`` epochs of ``iterations`` training and 1 validation iterations."""
    epochs, iterations = 6, 3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = self.epochs, \
            self.iterations, 1


class nnUNetTrainer_engine(Short, nnUNetTrainer): pass
class nnUNetTrainerNoDA_engine(Short, nnUNetTrainerNoDA): pass
