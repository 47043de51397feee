"""Shorter schedules, named like stock nnUNetTrainer_Xepochs (one line each)."""
import torch

from nnunetv2_voxshield.trainers.baselines import nnUNetTrainerEM, nnUNetTrainerUMed
from nnunetv2_voxshield.trainers.eot import nnUNetTrainerVoxShieldEOT
from nnunetv2_voxshield.trainers.voxshield import nnUNetTrainerVoxShield


class FixedEpochs:
    """Mixin: ``num_epochs`` from the class attribute ``epochs``."""
    epochs = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs


class nnUNetTrainerVoxShield_1epochs(FixedEpochs, nnUNetTrainerVoxShield): epochs = 1
class nnUNetTrainerVoxShield_5epochs(FixedEpochs, nnUNetTrainerVoxShield): epochs = 5
class nnUNetTrainerVoxShield_10epochs(FixedEpochs, nnUNetTrainerVoxShield): epochs = 10
class nnUNetTrainerVoxShield_20epochs(FixedEpochs, nnUNetTrainerVoxShield): epochs = 20
class nnUNetTrainerVoxShield_50epochs(FixedEpochs, nnUNetTrainerVoxShield): epochs = 50
class nnUNetTrainerVoxShield_100epochs(FixedEpochs, nnUNetTrainerVoxShield): epochs = 100

class nnUNetTrainerEM_1epochs(FixedEpochs, nnUNetTrainerEM): epochs = 1
class nnUNetTrainerEM_5epochs(FixedEpochs, nnUNetTrainerEM): epochs = 5
class nnUNetTrainerEM_10epochs(FixedEpochs, nnUNetTrainerEM): epochs = 10
class nnUNetTrainerEM_20epochs(FixedEpochs, nnUNetTrainerEM): epochs = 20
class nnUNetTrainerEM_50epochs(FixedEpochs, nnUNetTrainerEM): epochs = 50
class nnUNetTrainerEM_100epochs(FixedEpochs, nnUNetTrainerEM): epochs = 100

class nnUNetTrainerUMed_1epochs(FixedEpochs, nnUNetTrainerUMed): epochs = 1
class nnUNetTrainerUMed_5epochs(FixedEpochs, nnUNetTrainerUMed): epochs = 5
class nnUNetTrainerUMed_10epochs(FixedEpochs, nnUNetTrainerUMed): epochs = 10
class nnUNetTrainerUMed_20epochs(FixedEpochs, nnUNetTrainerUMed): epochs = 20
class nnUNetTrainerUMed_50epochs(FixedEpochs, nnUNetTrainerUMed): epochs = 50
class nnUNetTrainerUMed_100epochs(FixedEpochs, nnUNetTrainerUMed): epochs = 100

class nnUNetTrainerVoxShieldEOT_1epochs(FixedEpochs, nnUNetTrainerVoxShieldEOT): epochs = 1
class nnUNetTrainerVoxShieldEOT_5epochs(FixedEpochs, nnUNetTrainerVoxShieldEOT): epochs = 5
class nnUNetTrainerVoxShieldEOT_10epochs(FixedEpochs, nnUNetTrainerVoxShieldEOT): epochs = 10
class nnUNetTrainerVoxShieldEOT_20epochs(FixedEpochs, nnUNetTrainerVoxShieldEOT): epochs = 20
class nnUNetTrainerVoxShieldEOT_50epochs(FixedEpochs, nnUNetTrainerVoxShieldEOT): epochs = 50
class nnUNetTrainerVoxShieldEOT_100epochs(FixedEpochs, nnUNetTrainerVoxShieldEOT): epochs = 100
