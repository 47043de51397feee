"""nnUNetTrainerVoxShield: trains the VoxShield noise generator inside nnU-Net's loop (arXiv 2605.17345, Alg. 1).

The nnU-Net network is the surrogate F_s and keeps nnU-Net's own optimiser, loss and augmentation. Each
``train_step`` is either a surrogate step (nnU-Net's normal step on x + delta.detach()) or a generator step
(minimise Eq. 6 with F_s frozen); ``surrogate_steps_per_cycle`` : ``generator_steps_per_cycle`` sets the ratio.
Default 1:1, alternating batch by batch: Alg. 1 alternates the two players, and an error-minimising shortcut only
forms while the surrogate keeps learning on the perturbed data; one step each keeps the cost at ~1.5x stock nnU-Net.
"""
import warnings
from contextlib import contextmanager
from typing import List

import numpy as np
import torch
from torch import autocast

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_voxshield.budget import (DEFAULT_BUDGET_MODE, DEFAULT_EPS, DEFAULT_PERCENTILES, bound_perturbation,
                                       roi_mask)
from nnunetv2_voxshield.distributed import unwrap, wrap_ddp
from nnunetv2_voxshield.generator import NoiseGenerator, generator_kwargs_from_plans
from nnunetv2_voxshield.losses import generator_objective, inter_slice_spectral_loss, spectral_divergence_loss
from nnunetv2_voxshield.trainers.protector import ProtectorTrainer

LOG_KEYS = ('voxshield_l_seg', 'voxshield_l_isc', 'voxshield_l_spd', 'voxshield_delta_over_budget')


class nnUNetTrainerVoxShield(ProtectorTrainer, nnUNetTrainer):
    """VoxShield (Alg. 1): nnU-Net's network is the surrogate F_s, a noise generator G is trained alternately to
    minimise Eq. 6 (see the module docstring)."""
    method = 'voxshield'
    eps = DEFAULT_EPS                 # fraction in (0, 1] of the budget window of budget_mode, per channel
    budget_mode = DEFAULT_BUDGET_MODE  # 'range' (p0.5-p99.5), 'zscore' (10 x case std), 'zscore-dataset'
    eps_abs = None                    # absolute budget in raw units (e.g. HU) instead of eps
    percentiles = DEFAULT_PERCENTILES
    lambda_isc = 0.2                  # Eq. 6
    lambda_spd = 0.05                 # Eq. 6
    generator_lr = 1e-4               # Adam
    surrogate_steps_per_cycle = 1
    generator_steps_per_cycle = 1
    slice_axis = 0                    # spatial axis of nnU-Net's array order along which L_ISC compares slices
    roi_dilation = 0                  # voxels
    roi_soft_edge = 0.0               # voxels
    generator_max_stages = 4
    generator_feature_divisor = 2
    log_keys = LOG_KEYS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.generator = self.generator_optimizer = self.generator_grad_scaler = None
        self.generator_kwargs = None
        self.case_budgets = None
        self.voxshield_iteration = 0

    def initialize(self):
        """As nnU-Net's, plus G (sized from the plans), its Adam optimiser and (CUDA) grad scaler."""
        super().initialize()
        self.generator_kwargs = generator_kwargs_from_plans(
            self.configuration_manager, self.num_input_channels, self.generator_max_stages,
            self.generator_feature_divisor)
        self.generator = self.build_generator().to(self.device)
        self.generator_optimizer = torch.optim.Adam(self.generator_param_groups(), lr=self.generator_lr)
        if self.device.type == 'cuda':
            self.generator_grad_scaler = torch.amp.GradScaler('cuda')
        if self.is_ddp:
            self.generator = wrap_ddp(self.generator, self.device)

    def generator_param_groups(self) -> list:
        """Adam's parameter groups for G (one, at ``generator_lr``; subclasses may give parts their own rate)."""
        return [{'params': list(self.generator.parameters())}]

    def build_generator(self) -> torch.nn.Module:
        """G; export rebuilds it from the checkpoint's method and generator_kwargs."""
        return NoiseGenerator(**self.generator_kwargs)

    def on_train_start(self):
        """As nnU-Net's, plus the per-case budgets (unless resumed); warns about cases with an empty ROI."""
        super().on_train_start()  # ProtectorTrainer: the checkpoint note and the case budgets (unless resumed)
        empty = sorted(k for k, v in self.case_budgets.items() if v['empty_roi'])
        if empty:
            message = (f'WARNING: {len(empty)} of {len(self.case_budgets)} cases have an empty ROI (all background '
                       f'labels); their perturbation is zero: {", ".join(empty[:5])}{" ..." if len(empty) > 5 else ""}')
            self.print_to_log_file(message)
            warnings.warn(message)

    def _batch_eps(self, keys, like: torch.Tensor) -> torch.Tensor:
        """Per-sample, per-channel budget in normalised units, shaped (b, c, 1, ...)."""
        eps = torch.tensor([self.case_budgets[k]['eps_norm'] for k in keys], dtype=like.dtype, device=like.device)
        return eps.view(*eps.shape, *([1] * (like.ndim - 2)))

    def perturbation(self, data: torch.Tensor, target, keys) -> torch.Tensor:
        """Eq. 3: delta = clamp(G(x) * M, -eps, eps), with G's tanh output scaled by the case budget."""
        target0 = target[0] if isinstance(target, list) else target
        mask = roi_mask(target0, dilation=self.roi_dilation, soft_edge=self.roi_soft_edge,
                        ignore_label=self.label_manager.ignore_label)
        eps = self._batch_eps(keys, data)
        return bound_perturbation(self.generator(data) * eps, mask, eps), eps

    def train_step(self, batch: dict) -> dict:
        """A surrogate step or a generator step (Eq. 6), alternating as set by the ``*_steps_per_cycle`` attributes."""
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        cycle = self.surrogate_steps_per_cycle + self.generator_steps_per_cycle
        is_generator_step = self.voxshield_iteration % cycle >= self.surrogate_steps_per_cycle
        self.voxshield_iteration += 1
        if is_generator_step:
            return self.generator_step(data, target, batch['keys'])
        return self.surrogate_step(data, target, batch['keys'])

    def surrogate_step(self, data, target, keys) -> dict:
        """nnU-Net's own training step on x + delta (delta detached)."""
        with torch.no_grad():
            delta, eps = self.perturbation(data, target, keys)
            l_isc = inter_slice_spectral_loss(delta, self.slice_axis).item()
        out = super().train_step({'data': data + delta, 'target': target})
        return {**out, 'l_seg': float(out['loss']), 'l_isc': l_isc, 'l_spd': np.nan,
                'delta_over_budget': self._delta_over_budget(delta, eps)}

    def generator_step(self, data, target, keys) -> dict:
        """Minimise Eq. 6 w.r.t. G with the surrogate frozen (its weights and optimiser untouched)."""
        with self.frozen_surrogate():
            with self.maybe_autocast():
                delta, eps = self.perturbation(data, target, keys)
                output = self.network(data + delta)
                l_seg = self.loss(output, target)
                with torch.no_grad():
                    clean_output = self.network(data)
                l_spd = spectral_divergence_loss(_full_resolution(output), _full_resolution(clean_output))
                l_isc = inter_slice_spectral_loss(delta.float(), self.slice_axis)
                l_g = generator_objective(l_seg, l_isc, l_spd, self.lambda_isc, self.lambda_spd)
            self.update_generator(l_g)
        return {'loss': l_seg.detach().cpu().numpy(), 'l_seg': l_seg.item(), 'l_isc': l_isc.item(),
                'l_spd': l_spd.item(), 'delta_over_budget': self._delta_over_budget(delta, eps)}

    @contextmanager
    def frozen_surrogate(self):
        """The frame of a generator step: F_s frozen (no gradients into it), G's gradients cleared."""
        self.network.requires_grad_(False)
        self.generator_optimizer.zero_grad(set_to_none=True)
        try:
            yield
        finally:
            self.network.requires_grad_(True)

    def maybe_autocast(self):
        """Mixed precision on CUDA, as nnU-Net's own train_step."""
        return autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context()

    def update_generator(self, l_g: torch.Tensor) -> None:
        """Backward of the generator objective and one Adam step on G (nnU-Net's grad clipping and scaling)."""
        if self.generator_grad_scaler is not None:
            self.generator_grad_scaler.scale(l_g).backward()
            self.generator_grad_scaler.unscale_(self.generator_optimizer)
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 12)
            self.generator_grad_scaler.step(self.generator_optimizer)
            self.generator_grad_scaler.update()
        else:
            l_g.backward()
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 12)
            self.generator_optimizer.step()

    @staticmethod
    def _delta_over_budget(delta: torch.Tensor, eps: torch.Tensor) -> float:
        return float((delta.detach().abs() / eps.clamp_min(1e-12)).max())

    def on_train_epoch_end(self, train_outputs: List[dict]):
        """As nnU-Net's, plus the epoch's mean L_seg, L_ISC, L_SPD and max |delta| / budget in the log."""
        super().on_train_epoch_end([{'loss': o['loss']} for o in train_outputs])
        means = {'voxshield_l_seg': _nanmean(o['l_seg'] for o in train_outputs),
                 'voxshield_l_isc': _nanmean(o['l_isc'] for o in train_outputs),
                 'voxshield_l_spd': _nanmean(o['l_spd'] for o in train_outputs),
                 'voxshield_delta_over_budget': float(np.max([o['delta_over_budget'] for o in train_outputs]))}
        for key, value in means.items():
            self.logger.log(key, value, self.current_epoch)
        self.print_to_log_file('VoxShield: L_seg %.4f  L_ISC %.4g  L_SPD %.4g  max|delta|/budget %.3f' % tuple(
            means[k] for k in LOG_KEYS))

    def voxshield_state(self) -> dict:
        """What export needs to rebuild G, plus what --c needs to resume exactly (see export's checkpoint contract)."""
        return {'method': self.method, 'generator_kwargs': self.generator_kwargs,
                'generator_weights': unwrap(self.generator).state_dict(),
                'generator_optimizer_state': self.generator_optimizer.state_dict(),
                'generator_grad_scaler_state': self.generator_grad_scaler.state_dict()
                if self.generator_grad_scaler is not None else None,
                'eps': self.eps, 'eps_abs': self.eps_abs, 'percentiles': list(self.percentiles),
                'budget_mode': self.budget_mode,
                'roi': {'dilation': self.roi_dilation, 'soft_edge': self.roi_soft_edge}, 'eps_bg': 0.0,
                'slice_axis': self.slice_axis, 'lambda_isc': self.lambda_isc, 'lambda_spd': self.lambda_spd,
                'iteration': self.voxshield_iteration, 'case_budgets': self.case_budgets}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """As nnU-Net's, plus G, its optimiser and scaler, the iteration, case budgets and RNG states."""
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False) \
            if isinstance(filename_or_checkpoint, str) else filename_or_checkpoint
        state = checkpoint.get('voxshield')
        if state is None:
            raise RuntimeError(f'{filename_or_checkpoint} is not a VoxShield checkpoint (no generator inside)')
        unwrap(self.generator).load_state_dict(state['generator_weights'])
        self.generator_optimizer.load_state_dict(state['generator_optimizer_state'])
        if self.generator_grad_scaler is not None and state.get('generator_grad_scaler_state') is not None:
            self.generator_grad_scaler.load_state_dict(state['generator_grad_scaler_state'])
        self.voxshield_iteration = state['iteration']
        self.case_budgets = state['case_budgets']
        self.resume_rng_state = checkpoint.get('rng_state')


def _full_resolution(output):
    return output[0] if isinstance(output, (list, tuple)) else output


def _nanmean(values) -> float:
    values = np.asarray(list(values), dtype=float)
    return float(np.nanmean(values)) if np.any(np.isfinite(values)) else float('nan')


class nnUNetTrainerVoxShield_noISC(nnUNetTrainerVoxShield):
    """Ablation: without the inter-slice spectral term (lambda_ISC = 0)."""
    lambda_isc = 0.0


class nnUNetTrainerVoxShield_noSPD(nnUNetTrainerVoxShield):
    """Ablation: without the logit-divergence term (lambda_SPD = 0)."""
    lambda_spd = 0.0
