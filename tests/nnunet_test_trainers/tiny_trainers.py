"""Stock nnU-Net trainers shortened for tests (found through nnUNet_extTrainer; see tests/conftest.py)."""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_tiny(nnUNetTrainer):
    """Stock nnUNetTrainer, 1 epoch of 2 training and 1 validation iterations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1


from nnunetv2_voxshield.trainers import nnUNetTrainerVoxShield  # noqa: E402


class nnUNetTrainerVoxShield_tiny(nnUNetTrainerVoxShield):
    """nnUNetTrainerVoxShield, 1 epoch of 4 training (2 surrogate + 2 generator) and 1 validation iterations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 1


from nnunetv2_voxshield.trainers import nnUNetTrainerEM, nnUNetTrainerUMed  # noqa: E402


class nnUNetTrainerEM_tiny(nnUNetTrainerEM):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1


class nnUNetTrainerUMed_tiny(nnUNetTrainerUMed):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 5, 1


from nnunetv2_voxshield.trainers import nnUNetTrainerVoxShieldEOT  # noqa: E402


class nnUNetTrainerVoxShieldEOT_tiny(nnUNetTrainerVoxShieldEOT):
    """nnUNetTrainerVoxShieldEOT, 1 epoch of 2 training (1 surrogate + 1 generator) and 1 validation iterations."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1
