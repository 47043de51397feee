"""The sample-wise EM trainers shortened for tests (``Tiny`` from tiny_trainers.py): 1 epoch of 4 iterations (2
surrogate steps, 2 PGD batches of 2 steps); ``_tinyStop``: up to 3 epochs with a stop_loss every loss is below, so the
stop rule ends training after the first, and skips nnU-Net's final validation (CPU time: the surrogate's predictions are
not what the test looks at)."""
import torch
from tiny_trainers import Tiny

from nnunetv2_voxshield.trainers import nnUNetTrainerEMSampleWise, nnUNetTrainerEMSampleWiseEOT


class nnUNetTrainerEMSampleWise_tiny(Tiny, nnUNetTrainerEMSampleWise):
    iterations = 4
    pgd_steps = 2


class nnUNetTrainerEMSampleWiseEOT_tiny(Tiny, nnUNetTrainerEMSampleWiseEOT):
    iterations = 4
    pgd_steps = 2


class nnUNetTrainerEMSampleWise_tinyStop(nnUNetTrainerEMSampleWise_tiny):
    stop_loss = 100.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file('validation skipped (test trainer)')
