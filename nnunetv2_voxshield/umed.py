"""UMed adapted to 3D (Sun et al., IJCAI 2024): contour perturbator (central-difference-conv encoder) on the ROI's
contour band plus a texture perturbator bounded by the LBP texture map inside the ROI. Shared by the trainer and
export, so export needs nothing of the trainer beyond the checkpoint.
"""
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from skimage.feature import local_binary_pattern

from nnunetv2_voxshield.generator import NoiseGenerator


class _CentralDifferenceMixin:
    """UMed Eq. 3 (CDC): y(p0) = sum_n w(p_n) x(p0 + p_n) + theta * (-x(p0) * sum_n w(p_n))."""
    theta = 0.7

    def forward(self, x):
        out = self._conv_forward(x, self.weight, self.bias)
        if self.theta == 0:
            return out
        spatial = tuple(range(2, self.weight.ndim))
        kernel_sum = self.weight.sum(dim=spatial, keepdim=True)
        centre = F.conv3d if self.weight.ndim == 5 else F.conv2d
        return out - self.theta * centre(x, kernel_sum, None, self.stride, 0, 1, self.groups)


class CentralDifferenceConv3d(_CentralDifferenceMixin, nn.Conv3d):
    """3D central-difference convolution (UMed Eq. 3, theta = 0.7)."""
    pass


class CentralDifferenceConv2d(_CentralDifferenceMixin, nn.Conv2d):
    """2D central-difference convolution (UMed Eq. 3, theta = 0.7)."""
    pass


class ContourGenerator(nn.Module):
    """Encoder-decoder generator; the encoder's convolutions are central-difference convolutions, output in [-1, 1]."""

    def __init__(self, dims: int, in_channels: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], n_conv_per_stage: int = 1):
        super().__init__()
        self.dims = dims
        conv, norm = (CentralDifferenceConv3d, nn.InstanceNorm3d) if dims == 3 else (CentralDifferenceConv2d,
                                                                                     nn.InstanceNorm2d)
        self.encoder = PlainConvEncoder(
            in_channels, len(features_per_stage), list(features_per_stage), conv, [list(k) for k in kernel_sizes],
            [list(s) for s in strides], n_conv_per_stage, conv_bias=True, norm_op=norm,
            norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU, nonlin_kwargs={'inplace': True},
            return_skips=True)
        self.encoder.conv_op = nn.Conv3d if dims == 3 else nn.Conv2d  # the decoder is a plain one
        self.decoder = UNetDecoder(self.encoder, in_channels, n_conv_per_stage, deep_supervision=False)

    def forward(self, x):
        """Unit-free contour pattern in [-1, 1] with the shape of x."""
        return torch.tanh(self.decoder(self.encoder(x)))


class UMedPerturbator(nn.Module):
    """The two UMed generators; ``forward`` gives their unit-free patterns (contour, texture), each in [-1, 1]."""

    def __init__(self, generator_kwargs: dict):
        super().__init__()
        self.dims = generator_kwargs['dims']
        self.contour = ContourGenerator(**generator_kwargs)
        self.texture = NoiseGenerator(**generator_kwargs)

    def forward(self, x):
        """(contour, texture) patterns of x, each in [-1, 1] with the shape of x."""
        return self.contour(x), self.texture(x)


def contour_band(mask: torch.Tensor, width: float = 2, spacing: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Dilation minus erosion of a binary mask (b, 1, *spatial) by a box of radius ``width``: in voxels (a cube) if
    ``spacing`` is None, as the trainer uses it, else in mm (floor(width / spacing) voxels per axis)."""
    pool = F.max_pool3d if mask.ndim == 5 else F.max_pool2d
    dims = mask.ndim - 2
    radii = [int(width)] * dims if spacing is None else [int(np.floor(float(width) / float(s) + 1e-9))
                                                         for s in spacing]
    k = [2 * r + 1 for r in radii]
    dilated = pool(mask, k, stride=1, padding=radii)
    eroded = -pool(-mask, k, stride=1, padding=radii)
    return (dilated - eroded).clamp(0, 1)


def lbp_texture_map(image: np.ndarray, slice_axis: int = 0, points: int = 8, radius: float = 1.0) -> np.ndarray:
    """Uniform LBP (scikit-image) per slice along ``slice_axis`` of a (*spatial) volume, scaled to [0, 1].

    Slices are quantised to 8 bits over their own range first (LBP is invariant to monotonic intensity changes).
    A 2D image is one slice.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        return _lbp_slice(image, points, radius)
    moved = np.moveaxis(image, slice_axis, 0)
    out = np.stack([_lbp_slice(s, points, radius) for s in moved])
    return np.moveaxis(out, 0, slice_axis)


def _lbp_slice(s: np.ndarray, points: int, radius: float) -> np.ndarray:
    lo, hi = s.min(), s.max()
    q = np.zeros(s.shape, np.uint8) if hi <= lo else np.round((s - lo) / (hi - lo) * 255).astype(np.uint8)
    return local_binary_pattern(q, points, radius, method='uniform') / (points + 1)


def batch_texture_map(x: torch.Tensor, slice_axis: int = 0) -> torch.Tensor:
    """``lbp_texture_map`` of every sample and channel of a batch (b, c, *spatial), as a tensor like x."""
    maps = [[lbp_texture_map(xc, slice_axis) for xc in xb] for xb in x.detach().float().cpu().numpy()]
    return torch.as_tensor(np.asarray(maps), dtype=x.dtype, device=x.device)


def umed_perturbation(contour_pattern: torch.Tensor, texture_pattern: torch.Tensor, roi: torch.Tensor,
                      texture_map: torch.Tensor, eps: torch.Tensor, band_width: int = 2, use_contour: bool = True,
                      use_texture: bool = True) -> torch.Tensor:
    """delta_c + delta_t, both (b, c, *spatial):

    delta_c = clamp(Gc(x) eps, -eps, eps) on the contour band of the ROI (``band_width`` in voxels, a cube);
    delta_t = clamp(Gt(x) eps LBP, -eps LBP, eps LBP) inside the ROI minus the band (UMed Eq. 5).
    The supports are disjoint, so |delta| <= eps everywhere and delta = 0 outside ROI + band.
    """
    binary_roi = (roi > 0).float()
    band = contour_band(binary_roi, band_width)
    delta = torch.zeros_like(contour_pattern)
    if use_contour:
        delta = delta + torch.maximum(torch.minimum(contour_pattern * eps, eps), -eps) * band
    if use_texture:
        bound = eps * texture_map
        inner = binary_roi * (1 - band)
        delta = delta + torch.maximum(torch.minimum(texture_pattern * bound, bound), -bound) * inner
    return delta


def clip_to_range(x: torch.Tensor, delta: torch.Tensor, low: Optional[torch.Tensor] = None,
                  high: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x_p = clip(x + delta) to each sample's own intensity range (UMed's clip), returned as x_p - x."""
    dims = tuple(range(2, x.ndim))
    low = x.amin(dim=dims, keepdim=True) if low is None else low
    high = x.amax(dim=dims, keepdim=True) if high is None else high
    return torch.maximum(torch.minimum(x + delta, high), low) - x
