"""Shorter schedules, named like stock nnUNetTrainer_Xepochs: ``<Trainer>_<N>epochs`` for every trainer below."""
import torch

from nnunetv2_voxshield.trainers.baselines import (nnUNetTrainerEM, nnUNetTrainerUMed, nnUNetTrainerUMed_contourOnly,
                                                   nnUNetTrainerUMed_textureOnly)
from nnunetv2_voxshield.trainers.eot import (nnUNetTrainerVoxShieldEOT, nnUNetTrainerVoxShieldEOT_defAware,
                                             nnUNetTrainerVoxShieldEOT_noBG)
from nnunetv2_voxshield.trainers.eot2d import nnUNetTrainerVoxShieldEOT_2DAware
from nnunetv2_voxshield.trainers.voxshield import (nnUNetTrainerVoxShield, nnUNetTrainerVoxShield_noISC,
                                                   nnUNetTrainerVoxShield_noSPD)

EPOCHS = (1, 5, 10, 20, 50, 100)
BASES = (nnUNetTrainerVoxShield, nnUNetTrainerVoxShield_noISC, nnUNetTrainerVoxShield_noSPD, nnUNetTrainerEM,
         nnUNetTrainerUMed, nnUNetTrainerUMed_contourOnly, nnUNetTrainerUMed_textureOnly, nnUNetTrainerVoxShieldEOT,
         nnUNetTrainerVoxShieldEOT_noBG, nnUNetTrainerVoxShieldEOT_defAware, nnUNetTrainerVoxShieldEOT_2DAware)


class FixedEpochs:
    """Mixin: ``num_epochs`` from the class attribute ``epochs``."""
    epochs = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs


def epoch_variant(base: type, epochs: int) -> type:
    """``<base>_<epochs>epochs``: ``base`` with a fixed number of epochs (a module-level class, found by name)."""
    name = f'{base.__name__}_{epochs}epochs'
    return type(name, (FixedEpochs, base), {'epochs': epochs, '__module__': __name__, '__qualname__': name})


globals().update({cls.__name__: cls for cls in (epoch_variant(b, e) for b in BASES for e in EPOCHS)})
