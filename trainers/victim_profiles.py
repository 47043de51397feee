"""Exploiter profiles as victim trainers: each differs from stock nnU-Net in one thing (``_intensityMirrorOnly``,
a mechanism test, in three); ``<profile>_<N>epochs`` too.

- ``nnUNetTrainerNoDA_<N>epochs``: stock ``nnUNetTrainerNoDA`` (the paper's victim setting), fixed epochs.
- ``nnUNetTrainerDA_no<Family>``: stock augmentation minus one transform family (``FAMILIES``).
- ``nnUNetTrainerDA_intensityMirrorOnly``: stock minus the three families that filter the image (spatial
  resampling, noise/blur, low resolution): only brightness, contrast, gamma and mirroring stay.
- ``nnUNetTrainerDA_only<Family>`` (Spatial, NoiseBlur, LowRes): stock minus the other two filtering families, so one
  family alone filters the image (mechanism tests, like ``_intensityMirrorOnly``).
- ``nnUNetTrainerVanillaAdam5en4``: the paper's victim optimiser (stock's ``nnUNetTrainerAdam`` is AdamW, lr 1e-2).
- ``nnUNetTrainerLabelAware``: stock augmentation + per-class offsets and a smooth field (``exploiter_transforms``).
"""
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import \
    nnUNetTrainerNoDA as StockNoDA
from nnunetv2.training.nnUNetTrainer.variants.optimizer.nnUNetTrainerAdam import \
    nnUNetTrainerVanillaAdam as StockVanillaAdam

from nnunetv2_voxshield.exploiter_transforms import LabelAwareIntensityTransform
from nnunetv2_voxshield.trainers.epochs import epoch_variant

EPOCHS = (1, 5, 10, 20)
FAMILIES = {  # transform classes of stock's get_training_transforms, by augmentation family
    'spatial': (SpatialTransform, Convert3DTo2DTransform, Convert2DTo3DTransform),  # + its pseudo-2D reshape
    'noise_blur': (GaussianNoiseTransform, GaussianBlurTransform),
    'intensity': (MultiplicativeBrightnessTransform, ContrastTransform, GammaTransform),  # gamma: both, inverted too
    'lowres': (SimulateLowResolutionTransform,),
    'mirror': (MirrorTransform,),
}


def without(pipeline: ComposeTransforms, classes: tuple) -> ComposeTransforms:
    """``pipeline`` minus every transform of ``classes``, bare or wrapped in RandomTransform (nested Compose too)."""
    kept = []
    for t in pipeline.transforms:
        if isinstance(t.transform if isinstance(t, RandomTransform) else t, classes):
            continue
        kept.append(without(t, classes) if isinstance(t, ComposeTransforms) else t)
    return ComposeTransforms(kept)


def insert_after(pipeline: ComposeTransforms, classes: tuple, transform) -> ComposeTransforms:
    """``pipeline`` with ``transform`` right after its last top-level transform of ``classes``."""
    i = max(i for i, t in enumerate(pipeline.transforms) if isinstance(t, classes))
    return ComposeTransforms(pipeline.transforms[:i + 1] + [transform] + pipeline.transforms[i + 1:])


class _StockMinusFamily(nnUNetTrainer):
    """Stock augmentation minus the transform classes in ``removed``."""
    removed = ()

    @classmethod
    def get_training_transforms(cls, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, **kwargs):
        return without(nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales,
                                                             mirror_axes, do_dummy_2d_data_aug, **kwargs), cls.removed)


class nnUNetTrainerDA_noSpatial(_StockMinusFamily):
    """No rotation/scaling (SpatialTransform): the loader crops the final patch itself, as in stock NoDA."""
    removed = FAMILIES['spatial']

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """As stock, but the initial patch is the final patch (nothing to rotate or scale into it)."""
        rotation, dummy_2d, _, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return rotation, dummy_2d, self.configuration_manager.patch_size, mirror_axes


class nnUNetTrainerDA_noNoiseBlur(_StockMinusFamily):
    """No Gaussian noise, no Gaussian blur."""
    removed = FAMILIES['noise_blur']


class nnUNetTrainerDA_noIntensity(_StockMinusFamily):
    """No brightness, contrast or gamma (plain and inverted)."""
    removed = FAMILIES['intensity']


class nnUNetTrainerDA_noLowRes(_StockMinusFamily):
    """No low-resolution simulation."""
    removed = FAMILIES['lowres']


class nnUNetTrainerDA_noMirror(_StockMinusFamily):
    """No mirroring in training; unlike stock nnUNetTrainerNoMirroring, inference keeps stock test-time mirroring."""
    removed = FAMILIES['mirror']


class nnUNetTrainerDA_intensityMirrorOnly(nnUNetTrainerDA_noSpatial):
    """Stock minus spatial, noise/blur and low-resolution simulation: brightness, contrast, gamma and mirroring."""
    removed = FAMILIES['spatial'] + FAMILIES['noise_blur'] + FAMILIES['lowres']


class nnUNetTrainerDA_onlySpatial(_StockMinusFamily):
    """Stock minus noise/blur and low-resolution simulation: of the filtering families only resampling stays."""
    removed = FAMILIES['noise_blur'] + FAMILIES['lowres']


class nnUNetTrainerDA_onlyNoiseBlur(nnUNetTrainerDA_noSpatial):
    """Stock minus spatial and low-resolution simulation: of the filtering families only noise/blur stays."""
    removed = FAMILIES['spatial'] + FAMILIES['lowres']


class nnUNetTrainerDA_onlyLowRes(nnUNetTrainerDA_noSpatial):
    """Stock minus spatial and noise/blur: of the filtering families only low-resolution simulation stays."""
    removed = FAMILIES['spatial'] + FAMILIES['noise_blur']


class nnUNetTrainerVanillaAdam5en4(StockVanillaAdam):
    """Adam, lr 5e-4 (the paper's victim optimiser); as stock VanillaAdam: weight decay 3e-5, poly LR schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 5e-4


class nnUNetTrainerLabelAware(nnUNetTrainer):
    """Stock augmentation + LabelAwareIntensityTransform right after the spatial transform: per-class offsets
    U(-0.5, 0.5) and a smooth field (sigma 8-16 voxels, peak 0.1-0.5), each with p 0.5 (normalised units)."""

    @classmethod
    def get_training_transforms(cls, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, **kwargs):
        """Stock augmentation with LabelAwareIntensityTransform inserted after the spatial transform."""
        stock = nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales,
                                                      mirror_axes, do_dummy_2d_data_aug, **kwargs)
        return insert_after(stock, FAMILIES['spatial'],
                            LabelAwareIntensityTransform(labels=kwargs.get('foreground_labels')))


PROFILES = (StockNoDA, nnUNetTrainerDA_noSpatial, nnUNetTrainerDA_noNoiseBlur, nnUNetTrainerDA_noIntensity,
            nnUNetTrainerDA_noLowRes, nnUNetTrainerDA_noMirror, nnUNetTrainerDA_intensityMirrorOnly,
            nnUNetTrainerDA_onlySpatial, nnUNetTrainerDA_onlyNoiseBlur, nnUNetTrainerDA_onlyLowRes,
            nnUNetTrainerVanillaAdam5en4, nnUNetTrainerLabelAware)


def _schedule(base: type, epochs: int) -> type:
    cls = epoch_variant(base, epochs)
    cls.__module__ = __name__  # defined here, so pickle finds it here
    return cls


globals().update({cls.__name__: cls for cls in (_schedule(b, e) for b in PROFILES for e in EPOCHS)})
