"""A protector shortened for the crash tests (test_crash_safety.py): the label-conditioned trainer (EOT augmentation,
random tile phase, surrogate resets), 2 epochs of 3 iterations, one torch thread, seeded at construction so that two
fresh runs agree. Each training step appends {iteration, epoch, case keys, a checksum of the batch, tile phases,
losses} to ``steps.jsonl`` in the fold folder.

``VOXSHIELD_TEST_HOLD=<iteration>``: before that training step the process prints ``VOXSHIELD_TEST_HOLDING`` and
blocks on stdin, so that a test can kill it in the middle of an epoch. The final validation is skipped (not tested
here)."""
import json
import os
import random
import sys

import numpy as np
import torch

from tiny_trainers import Tiny

from nnunetv2_voxshield.trainers import nnUNetTrainerVoxShieldLC

HOLD_VARIABLE = 'VOXSHIELD_TEST_HOLD'
HOLD_MESSAGE = 'VOXSHIELD_TEST_HOLDING'
STEPS_FILE = 'steps.jsonl'


class nnUNetTrainerVoxShieldLC_crash(Tiny, nnUNetTrainerVoxShieldLC):
    iterations = 3
    surrogate_reset_every = 4         # a reset in the second epoch, after the resume point

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        torch.set_num_threads(1)
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.drawn_phases = []

    def _phases(self, batch_size: int):
        phases = super()._phases(batch_size)
        self.drawn_phases.append(phases)
        return phases

    def train_step(self, batch: dict) -> dict:
        if os.environ.get(HOLD_VARIABLE) == str(self.voxshield_iteration):
            print(HOLD_MESSAGE, flush=True)
            sys.stdin.read()
        iteration, self.drawn_phases = self.voxshield_iteration, []
        out = super().train_step(batch)
        step = {'iteration': iteration, 'epoch': self.current_epoch, 'keys': [str(k) for k in batch['keys']],
                'data_sum': float(batch['data'].double().sum()), 'phases': self.drawn_phases,
                'l_seg': out['l_seg'], 'l_isc': out['l_isc']}
        with open(os.path.join(self.output_folder, STEPS_FILE), 'a') as f:
            f.write(json.dumps(step) + '\n')
        return out

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass
