"""nnUNetTrainerVoxShieldEOT: VoxShield optimised for what the victim's augmentation does to x + delta (EOT).

The faithful trainer perturbs already augmented batches. Here the data loader only crops (to nnU-Net's initial,
larger patch, as stock), G sees the un-augmented crop, delta is added, and then the victim's own augmentation T
(stock ``get_training_transforms``: same transform families, ranges and probabilities, made differentiable in
``diff_augment``) is applied to x + delta and, with the same spatial parameters, to the target; deep-supervision
downsampling comes last, as stock. The surrogate trains on T(x + delta) exactly as a victim would; the generator
minimises Eq. 6 through T, i.e. E_T[L_seg(F_s(T(x + delta)), T(y))] (expectation over transformation).

The support does not draw the label: outside the ROI M, delta may use eps_bg (a fraction of the case's range like
eps), so the noise is small but non-zero there (``support``); saved as ``voxshield_state()['eps_bg']``.
With ``p_defence`` > 0 the EOT distribution also contains the purification defences (``diff_defences``).
"""
import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_voxshield.budget import roi_mask
from nnunetv2_voxshield.diff_augment import augment_batch, differentiable, replay_rng
from nnunetv2_voxshield.diff_defences import with_defences
from nnunetv2_voxshield.generator import run_padded
from nnunetv2_voxshield.losses import generator_objective, inter_slice_spectral_loss, spectral_divergence_loss
from nnunetv2_voxshield.support import background_eps, bounded_delta, support_bound
from nnunetv2_voxshield.trainers.voxshield import nnUNetTrainerVoxShield, _full_resolution


class nnUNetTrainerVoxShieldEOT(nnUNetTrainerVoxShield):
    """VoxShield through the victim's augmentation (EOT), with a small eps_bg outside the ROI (see the module
    docstring)."""
    method = 'voxshield_eot'
    eps_bg = 1 / 255                  # budget outside the ROI, fraction of each case's intensity range (0: none)
    p_defence = 0.0                   # probability of a purification defence D before T (defence-aware EOT)

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, **kwargs):
        """Keeps stock's pipeline as the differentiable T of the step; the loader itself only crops (None)."""
        stock = nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales,
                                                      mirror_axes, do_dummy_2d_data_aug, **kwargs)
        self.eot_transform = differentiable(stock)
        if self.p_defence > 0:
            self.eot_transform = with_defences(self.eot_transform, self.p_defence, self._z_axis(len(patch_size)))
        return None

    def _z_axis(self, dims: int):
        """Spatial axis of the patch that holds the raw image's z axis (None for 2D slices across z)."""
        axis = list(self.plans_manager.transpose_forward).index(0)
        if dims == 2:
            return axis - 1 if axis > 0 else None
        return axis

    def victim_view(self, x: torch.Tensor, seg: torch.Tensor):
        """T(x), T(y): the victim's augmentation per sample (on the CPU, like nnU-Net's loader), then to device."""
        x_t, seg_t = augment_batch(self.eot_transform, x.cpu(), seg.cpu())
        seg_t = [s.to(self.device) for s in seg_t] if isinstance(seg_t, list) else seg_t.to(self.device)
        return x_t.to(self.device), seg_t

    def generate(self, data: torch.Tensor) -> torch.Tensor:
        """G(x) for any patch size: zero-padded to a multiple of G's total stride, cropped back."""
        return run_padded(self.generator, data, self.generator_kwargs['strides'])

    def perturbation(self, data: torch.Tensor, target, keys):
        """Eq. 3 with b = max(eps * M, eps_bg): delta = clamp(G(x) * b, -b, b); returns delta and b."""
        mask = roi_mask(target[:, :1], dilation=self.roi_dilation, soft_edge=self.roi_soft_edge,
                        ignore_label=self.label_manager.ignore_label)
        eps = self._batch_eps(keys, data)
        bound = support_bound(mask, eps, background_eps(eps, self.eps, self.eps_bg))
        return bounded_delta(self.generate(data), bound), bound

    def surrogate_step(self, data, target, keys) -> dict:
        """nnU-Net's own training step on T(x + delta), T(y) (delta detached)."""
        with torch.no_grad():
            delta, bound = self.perturbation(data, target, keys)
            l_isc = inter_slice_spectral_loss(delta, self.slice_axis).item()
            x_t, y_t = self.victim_view(data + delta, target)
        out = nnUNetTrainer.train_step(self, {'data': x_t, 'target': y_t})
        self.train_extra_surrogates(data + delta, target)
        return {**out, 'l_seg': float(out['loss']), 'l_isc': l_isc, 'l_spd': np.nan,
                'delta_over_budget': self._delta_over_budget(delta, bound)}

    def generator_step(self, data, target, keys) -> dict:
        """Eq. 6 through T with F_s frozen: L_seg(F_s(T(x + delta)), T(y)), L_SPD against F_s(T(x)), same T."""
        with self.frozen_surrogate():
            with self.maybe_autocast():
                delta, bound = self.perturbation(data, target, keys)
                with replay_rng() as rewind:
                    x_t, y_t = self.victim_view(data + delta, target)
                    rewind()
                    with torch.no_grad():
                        clean_t, _ = self.victim_view(data, target)
                        clean_output = self.network(clean_t)
                output = self.network(x_t)
                l_seg = self.loss(output, y_t)
                l_spd = spectral_divergence_loss(_full_resolution(output), _full_resolution(clean_output))
                l_isc = inter_slice_spectral_loss(delta.float(), self.slice_axis)
                l_g = generator_objective(l_seg + self.extra_surrogate_loss(data + delta, target), l_isc, l_spd,
                                          self.lambda_isc, self.lambda_spd)
            self.update_generator(l_g)
        return {'loss': l_seg.detach().cpu().numpy(), 'l_seg': l_seg.item(), 'l_isc': l_isc.item(),
                'l_spd': l_spd.item(), 'delta_over_budget': self._delta_over_budget(delta, bound)}

    def train_extra_surrogates(self, x_perturbed: torch.Tensor, target) -> None:
        """Hook: train further surrogates on the un-augmented x + delta (detached) after the 3D step (none here)."""

    def extra_surrogate_loss(self, x_perturbed: torch.Tensor, target) -> torch.Tensor:
        """Hook: further surrogates' L_seg on x + delta, added to Eq. 6's L_seg (none here)."""
        return x_perturbed.new_zeros(())

    def voxshield_state(self) -> dict:
        """Adds eps_bg: export bounds delta by eps inside M and eps_bg outside (both x the case's range)."""
        return {**super().voxshield_state(), 'eps_bg': float(self.eps_bg),
                'eot': {'p_defence': float(self.p_defence)}}


class nnUNetTrainerVoxShieldEOT_noBG(nnUNetTrainerVoxShieldEOT):
    """Ablation: EOT with the support equal to the ROI (eps_bg = 0, as the faithful trainer)."""
    eps_bg = 0.0


class nnUNetTrainerVoxShieldEOT_defAware(nnUNetTrainerVoxShieldEOT):
    """Defence-aware EOT: with probability 0.5, T starts with z-median 3, Gaussian blur 1 or 2x z down/up."""
    p_defence = 0.5
