"""nnU-Net's ignore label is not foreground in the trainers (issue 30.3): no budget and no delta there."""
import types

import torch

from nnunetv2_voxshield.trainers.eot import nnUNetTrainerVoxShieldEOT
from nnunetv2_voxshield.trainers.voxshield import nnUNetTrainerVoxShield

IGNORE = 3


def fake_trainer(cls, eps_bg=0.0):
    """A trainer object with just what ``perturbation`` reads: budgets per case, a generator, the label manager."""
    t = object.__new__(cls)
    t.label_manager = types.SimpleNamespace(ignore_label=IGNORE)
    t.roi_dilation, t.roi_soft_edge, t.eps, t.eps_bg = 0, 0.0, 4 / 255, eps_bg
    t.case_budgets = {'a': {'eps_norm': [0.5]}, 'b': {'eps_norm': [0.25]}}
    t.generator = lambda x: torch.ones_like(x)
    t.generate = lambda x: torch.ones_like(x)
    return t


def target():
    seg = torch.zeros(2, 1, 4, 6, 6)
    seg[:, :, 1:3, 1:3, 1:3] = 1
    seg[:, :, 1:3, 3:5, 3:5] = IGNORE
    return seg


def test_voxshield_delta_is_zero_on_the_ignore_label():
    seg = target()
    delta, eps = fake_trainer(nnUNetTrainerVoxShield).perturbation(torch.zeros(2, 1, 4, 6, 6), seg, ['a', 'b'])
    assert torch.all(delta[seg == IGNORE] == 0)
    assert torch.allclose(delta[0][seg[0] == 1], torch.tensor(0.5))
    assert torch.allclose(delta[1][seg[1] == 1], torch.tensor(0.25))


def test_eot_bound_on_the_ignore_label_is_the_background_one():
    seg = target()
    trainer = fake_trainer(nnUNetTrainerVoxShieldEOT, eps_bg=1 / 255)
    delta, bound = trainer.perturbation(torch.zeros(2, 1, 4, 6, 6), seg, ['a', 'b'])
    bg = 0.5 * (1 / 255) / (4 / 255)  # eps_bg as the same fraction of case a's budget
    assert torch.allclose(bound[0][seg[0] == IGNORE], torch.tensor(bg))
    assert torch.allclose(bound[0][seg[0] == 1], torch.tensor(0.5))
    assert torch.all(delta.abs() <= bound + 1e-7)
