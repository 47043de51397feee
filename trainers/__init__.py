"""nnU-Net trainer classes of nnunetv2-voxshield (installed as ``nnunetv2_voxshield.trainers``)."""
from nnunetv2_voxshield.trainers.voxshield import (nnUNetTrainerVoxShield, nnUNetTrainerVoxShield_noISC,
                                                   nnUNetTrainerVoxShield_noSPD)
from nnunetv2_voxshield.trainers.voxshield_epochs import (nnUNetTrainerVoxShield_1epochs,
                                                          nnUNetTrainerVoxShield_5epochs,
                                                          nnUNetTrainerVoxShield_10epochs,
                                                          nnUNetTrainerVoxShield_20epochs,
                                                          nnUNetTrainerVoxShield_50epochs,
                                                          nnUNetTrainerVoxShield_100epochs)

__all__ = ['nnUNetTrainerVoxShield', 'nnUNetTrainerVoxShield_noISC', 'nnUNetTrainerVoxShield_noSPD',
           'nnUNetTrainerVoxShield_1epochs', 'nnUNetTrainerVoxShield_5epochs', 'nnUNetTrainerVoxShield_10epochs',
           'nnUNetTrainerVoxShield_20epochs', 'nnUNetTrainerVoxShield_50epochs', 'nnUNetTrainerVoxShield_100epochs']
