"""The purification defences of ``defences.py`` as differentiable torch transforms, for defence-aware EOT.

Each class is a batchgeneratorsv2 ImageOnlyTransform on one sample (c, *spatial) and reproduces its numpy/scipy
counterpart (same kernels, same 'nearest'/'edge' borders): ``ZMedianTransform`` = ``defences.z_median``,
``GaussianBlur3DTransform`` = ``defences.gaussian_blur``, ``ZResampleTransform`` = ``defences.z_resample``.
``axis`` is the spatial axis that holds the raw image's z (slice) axis in nnU-Net's array order.
The defences act on raw intensities; they are linear (blur, resample) or order-preserving (median), so they
commute with nnU-Net's per-case affine normalisation and may be applied to normalised patches.
"""
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform


def _pad_axis(img: torch.Tensor, axis: int, before: int, after: int) -> torch.Tensor:
    """Edge ('nearest') padding of spatial ``axis`` of (c, *spatial)."""
    dim = axis + 1
    first = img.narrow(dim, 0, 1).expand(*[before if d == dim else -1 for d in range(img.ndim)])
    last = img.narrow(dim, img.shape[dim] - 1, 1).expand(*[after if d == dim else -1 for d in range(img.ndim)])
    return torch.cat([first, img, last], dim)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1D Gaussian: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return torch.from_numpy(k / k.sum())


def blur_axis(img: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter1d(mode='nearest') along spatial ``axis`` of (c, *spatial), differentiable."""
    if sigma <= 0:
        return img
    kernel = gaussian_kernel(sigma).to(img)
    radius = (len(kernel) - 1) // 2
    x = _pad_axis(img, axis, radius, radius).movedim(axis + 1, -1)
    shape = x.shape
    out = F.conv1d(x.reshape(-1, 1, shape[-1]), kernel.view(1, 1, -1))
    return out.reshape(*shape[:-1], out.shape[-1]).movedim(-1, axis + 1)


class ZMedianTransform(ImageOnlyTransform):
    """Median over ``size`` consecutive slices along ``axis`` (edge padding); gradient to the median voxel."""

    def __init__(self, size: int = 3, axis: int = 0):
        super().__init__()
        self.size, self.axis = int(size), int(axis)

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        r = self.size // 2
        windows = _pad_axis(img, self.axis, r, r).unfold(self.axis + 1, self.size, 1)
        return windows.median(dim=-1).values


class GaussianBlur3DTransform(ImageOnlyTransform):
    """Isotropic Gaussian blur with ``sigma`` voxels along every spatial axis (scipy's kernel, 'nearest' border)."""

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.sigma = float(sigma)

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        for axis in range(img.ndim - 1):
            img = blur_axis(img, self.sigma, axis)
        return img


class ZResampleTransform(ImageOnlyTransform):
    """Down by ``factor`` along ``axis`` (anti-aliased linear, as skimage.resize) and back up (linear)."""

    def __init__(self, factor: float = 2.0, axis: int = 0):
        super().__init__()
        self.factor, self.axis = float(factor), int(axis)

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        n = img.shape[self.axis + 1]
        low = max(1, int(round(n / self.factor)))
        if n < 2 or low == n:
            return img
        x = blur_axis(img, max(0.0, (n / low - 1) / 2), self.axis).movedim(self.axis + 1, -1)
        shape = x.shape
        x = F.interpolate(x.reshape(1, -1, n), size=low, mode='linear', align_corners=False)
        x = F.interpolate(x, size=n, mode='linear', align_corners=False)
        return x.reshape(shape).movedim(-1, self.axis + 1)


def defence_transform(probability: float, z_axis: Optional[int], dims: int = 3) -> RandomTransform:
    """With ``probability``: one of z-median 3, Gaussian blur sigma 1, 2x z down/up (uniformly). ``z_axis`` None:
    the patch has no z axis (2D slices across z), only the blur applies."""
    options = [GaussianBlur3DTransform(1.0)]
    if z_axis is not None:
        options = [ZMedianTransform(3, z_axis)] + options + [ZResampleTransform(2.0, z_axis)]
    return RandomTransform(OneOfTransform(options), apply_probability=probability)


def with_defences(pipeline: ComposeTransforms, probability: float, z_axis: Optional[int]) -> ComposeTransforms:
    """T o D: the victim augments a purified dataset; D comes first, on the un-augmented crop."""
    return ComposeTransforms([defence_transform(probability, z_axis)] + list(pipeline.transforms))
