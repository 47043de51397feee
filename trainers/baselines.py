"""Trainer-based baseline protectors, in the same harness as VoxShield (they differ only in what the class says)."""
import torch

from nnunetv2_voxshield.budget import roi_mask
from nnunetv2_voxshield.trainers.voxshield import nnUNetTrainerVoxShield
from nnunetv2_voxshield.umed import UMedPerturbator, batch_texture_map, clip_to_range, umed_perturbation


class nnUNetTrainerEM(nnUNetTrainerVoxShield):
    """Error-minimising noise (Huang et al., ICLR 2021) adapted to segmentation, generator form: G minimises the
    surrogate's Dice+CE on x + delta, alternating with surrogate training; no ISC/SPD terms."""
    method = 'em'
    lambda_isc = 0.0
    lambda_spd = 0.0


class nnUNetTrainerUMed(nnUNetTrainerVoxShield):
    """UMed-3D: contour perturbator (CDC encoder) on the ROI's contour band + LBP-bounded texture perturbator inside
    the ROI, x_p = clip(x + delta_c + delta_t); both generators minimise the surrogate's Dice+CE. UMed's Alg. 1 trains
    the generators 4 epochs per surrogate epoch: here 4 generator steps per surrogate step."""
    method = 'umed'
    lambda_isc = 0.0
    lambda_spd = 0.0
    generator_steps_per_cycle = 4
    contour_band_width = 2
    use_contour = True
    use_texture = True

    def build_generator(self) -> torch.nn.Module:
        """The two UMed generators (contour, texture) instead of G."""
        return UMedPerturbator(self.generator_kwargs)

    def perturbation(self, data, target, keys):
        """UMed's delta instead of Eq. 3: contour pattern on the ROI's contour band + LBP-bounded texture, with
        x + delta clipped to each sample's intensity range (UMed's clip); returns (delta, eps) as the parent."""
        target0 = target[0] if isinstance(target, list) else target
        roi = roi_mask(target0, dilation=self.roi_dilation, ignore_label=self.label_manager.ignore_label)
        eps = self._batch_eps(keys, data)
        contour, texture = self.generator(data)
        delta = umed_perturbation(contour, texture, roi, batch_texture_map(data, self.slice_axis), eps,
                                  self.contour_band_width, self.use_contour, self.use_texture)
        return clip_to_range(data, delta), eps

    def voxshield_state(self) -> dict:
        """The parent's state plus UMed's settings (contour band width, which patterns are used)."""
        return {**super().voxshield_state(), 'umed': {'band_width': self.contour_band_width,
                                                      'use_contour': self.use_contour,
                                                      'use_texture': self.use_texture}}


class nnUNetTrainerUMed_contourOnly(nnUNetTrainerUMed):
    """Ablation: contour perturbator only."""
    use_texture = False


class nnUNetTrainerUMed_textureOnly(nnUNetTrainerUMed):
    """Ablation: texture perturbator only."""
    use_contour = False
