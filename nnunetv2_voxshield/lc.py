"""Label-conditioned perturbation (issue 13): delta = b * tanh(P[y] + G(x, onehot(y))).

* P, the class code: one learnable pattern per foreground class, shared by every case. Each class owns a coarse
  ``pattern_grid``^d parameter grid, upsampled periodically (circular padding + (tri)linear interpolation) to a
  ``pattern_tile``^d tile that is tiled over the volume, so a class carries the same code in every case. Training
  draws the tile's phase in a patch at random (a victim's crops make it irrelevant); export tiles from the origin
  of the preprocessed array (nnU-Net's axis order). Background voxels get no code.
* G, the generated part: a U-Net (dynamic_network_architectures ``PlainConvUNet``, linear head) that sees the
  image and the one-hot labels (input channels = image channels + foreground classes), band-limited exactly in
  Fourier space (``band_limit``: ``band`` = 2 keeps |f| <= 1/4 cycles per voxel on every axis, the band of a
  signal generated at 1/2 resolution; ``band`` = 1: no filter). Export runs the U-Net by sliding window over the
  whole volume and band-limits the blended result once.
* b, the bound (``lc_bound``): eps inside the ROI (union of foreground labels, dilated), eps_bg outside, as
  ``support.support_bound``; with ``multiplicative`` it is further multiplied by the case's intensity rank
  w = clip((x - p_low) / (p_high - p_low), 0, 1) (percentiles of the preprocessed case), so b never exceeds the
  standard per-case budget that export and verify check.

All of it is a function of (data_norm, seg_pre, eps_norm) plus the checkpoint's weights, so training and export
share the math (``LabelCodedPerturbator``, ``lc_bound``); ``LCSource`` is the export source.
"""
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from torch import nn

from nnunetv2_voxshield.budget import roi_mask
from nnunetv2_voxshield.dataset_io import InputError
from nnunetv2_voxshield.generator import run_padded
from nnunetv2_voxshield.support import bounded_delta, support_bound

METHOD = 'voxshield_lc'


def one_hot_labels(seg: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """(b, 1, *spatial) label map -> (b, K, *spatial) float one-hot of the foreground ``labels`` (-1, 0: none)."""
    return torch.cat([(seg == int(label)) for label in labels], 1).float()


def band_mask(shape: Sequence[int], band: float, device=None) -> torch.Tensor:
    """Boolean rfftn mask of the frequencies kept by ``band_limit``: |f_i| <= 0.5 / band cycles/voxel on every axis."""
    cutoff = 0.5 / band + 1e-9
    axes = [torch.fft.fftfreq(n, device=device).abs() <= cutoff for n in shape[:-1]]
    axes.append(torch.fft.rfftfreq(shape[-1], device=device) <= cutoff)
    mask = axes[0]
    for axis in axes[1:]:
        mask = mask[..., None] & axis
    return mask


def band_limit(x: torch.Tensor, band: float) -> torch.Tensor:
    """Exact low-pass over the spatial axes of (b, c, *spatial): the DFT outside ``band_mask`` is set to zero."""
    if band <= 1:
        return x
    dims = tuple(range(2, x.ndim))
    spectrum = torch.fft.rfftn(x.to(torch.promote_types(x.dtype, torch.float32)), dim=dims)  # fp16: no FFT
    spectrum = spectrum * band_mask(x.shape[2:], band, x.device)
    return torch.fft.irfftn(spectrum, s=x.shape[2:], dim=dims)


def periodic_upsample(grid: torch.Tensor, tile: int) -> torch.Tensor:
    """(K, C, g, ..., g) -> (K, C, tile, ..., tile): (tri)linear interpolation that wraps around, so tiles join."""
    g = grid.shape[-1]
    if tile % g:
        raise ValueError(f'pattern_tile ({tile}) must be a multiple of pattern_grid ({g})')
    s, dims = tile // g, grid.ndim - 2
    padded = F.pad(grid, [1, 1] * dims, mode='circular')
    up = F.interpolate(padded, scale_factor=s, mode='trilinear' if dims == 3 else 'bilinear', align_corners=False)
    return up[(slice(None), slice(None), *[slice(s, s + tile)] * dims)]


def tile_pattern(tile: torch.Tensor, shape: Sequence[int], phase: Sequence[int]) -> torch.Tensor:
    """(K, C, *T) tile repeated over ``shape``: voxel i gets tile[(i + phase) mod T] on every axis."""
    out = tile
    for axis, (n, p) in enumerate(zip(shape, phase)):
        t = tile.shape[2 + axis]
        out = out.index_select(2 + axis, (torch.arange(n, device=tile.device) + int(p)) % t)
    return out


def class_code(onehot: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """P[y]: sum_k onehot_k * P_k; onehot (b, K, *s), patterns (b, K, C, *s) -> (b, C, *s)."""
    return (onehot.unsqueeze(2) * patterns).sum(1)


def intensity_window(data: np.ndarray, percentiles: Sequence[float]) -> list:
    """[(p_low, p_high) per channel] of a preprocessed case (c, *spatial), for the multiplicative bound."""
    flat = np.asarray(data, dtype=np.float64).reshape(data.shape[0], -1)
    low, high = np.percentile(flat, percentiles, axis=1)
    return [[float(a), float(b)] for a, b in zip(low, high)]


def lc_bound(mask: torch.Tensor, eps: torch.Tensor, eps_bg: torch.Tensor, x: Optional[torch.Tensor] = None,
             window: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """b = max(eps M, eps_bg), times w = clip((x - p_low) / (p_high - p_low), 0, 1) if ``window`` = (p_low, p_high)
    (each shaped like ``eps``): w <= 1, so b never exceeds the standard per-case bound."""
    bound = support_bound(mask, eps, eps_bg)
    if window is None:
        return bound
    low, high = window
    return bound * ((x - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)


class LabelCodedPerturbator(nn.Module):
    """P (class code) and G (band-limited U-Net on image + one-hot labels); ``forward`` gives P[y] + G before tanh.
    All arguments are JSON-serialisable: export rebuilds it from the checkpoint's ``generator_kwargs``."""

    def __init__(self, dims: int, in_channels: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], n_conv_per_stage: int = 1,
                 foreground_labels: Sequence[int] = (1,), band: float = 2.0, pattern_grid: int = 4,
                 pattern_tile: int = 16, pattern_init_std: float = 1.0, use_generator: bool = True):
        super().__init__()
        assert dims in (2, 3), f'dims must be 2 or 3, got {dims}'
        self.dims, self.in_channels = dims, in_channels
        self.labels = [int(label) for label in foreground_labels]
        self.band, self.pattern_tile, self.use_generator = float(band), int(pattern_tile), bool(use_generator)
        self.strides = [list(map(int, s)) for s in strides]
        if self.pattern_tile % int(pattern_grid):
            raise ValueError(f'pattern_tile ({pattern_tile}) must be a multiple of pattern_grid ({pattern_grid})')
        self.pattern = nn.Parameter(torch.randn(len(self.labels), in_channels, *[int(pattern_grid)] * dims)
                                    * pattern_init_std)
        self.unet = PlainConvUNet(
            input_channels=in_channels + len(self.labels), n_stages=len(features_per_stage),
            features_per_stage=list(features_per_stage), conv_op=nn.Conv3d if dims == 3 else nn.Conv2d,
            kernel_sizes=[list(k) for k in kernel_sizes], strides=self.strides, n_conv_per_stage=n_conv_per_stage,
            num_classes=in_channels, n_conv_per_stage_decoder=n_conv_per_stage, conv_bias=True,
            norm_op=nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d, norm_op_kwargs={'eps': 1e-5, 'affine': True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={'inplace': True}, deep_supervision=False)

    def tile(self) -> torch.Tensor:
        """The class codes' tile (K, C, *T)."""
        return periodic_upsample(self.pattern, self.pattern_tile)

    def code(self, onehot: torch.Tensor, phases: Sequence[Sequence[int]]) -> torch.Tensor:
        """P[y] with the tile at ``phases`` (one per sample)."""
        tile, shape = self.tile(), onehot.shape[2:]
        return class_code(onehot, torch.stack([tile_pattern(tile, shape, phase) for phase in phases]))

    def unet_output(self, inputs: torch.Tensor) -> torch.Tensor:
        """The U-Net on (x, onehot) for any size: zero-padded to a multiple of its total stride, cropped back."""
        return run_padded(self.unet, inputs, self.strides)

    def generated(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """G(x, onehot(y)), band-limited (zero when ``use_generator`` is off)."""
        if not self.use_generator:
            return torch.zeros_like(x)
        return band_limit(self.unet_output(torch.cat([x, onehot.to(x.dtype)], 1)), self.band)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor, phases: Sequence[Sequence[int]]) -> torch.Tensor:
        """P[y] + G(x, onehot(y)), the argument of tanh."""
        return self.code(onehot, phases) + self.generated(x, onehot)


@torch.inference_mode()
def sliding_window_unet(model: LabelCodedPerturbator, inputs: np.ndarray, patch_size: Sequence[int],
                        device: torch.device, tile_step_size: float = 0.5) -> np.ndarray:
    """``model.unet_output`` over a whole volume (c_in, *spatial) with nnU-Net's tiling and Gaussian blending."""
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    x, revert = pad_nd_image(x, patch_size, 'constant', {'value': 0}, True, None)
    size = x.shape[1:]
    gaussian = compute_gaussian(tuple(int(p) for p in patch_size), sigma_scale=1. / 8, value_scaling_factor=10,
                                dtype=torch.float32, device=torch.device('cpu'))
    out = torch.zeros((model.in_channels, *size), dtype=torch.float32)
    weight = torch.zeros(size, dtype=torch.float32)
    steps = compute_steps_for_sliding_window(size, patch_size, tile_step_size)
    for start in np.stack(np.meshgrid(*steps, indexing='ij'), -1).reshape(-1, len(size)):
        sl = tuple(slice(int(s), int(s) + int(p)) for s, p in zip(start, patch_size))
        out[(slice(None), *sl)] += model.unet_output(x[(slice(None), *sl)][None].to(device))[0].float().cpu() * gaussian
        weight[sl] += gaussian
    return (out / weight)[(slice(None), *revert[1:])].numpy()


class LCSource:
    """Export source of a ``voxshield_lc`` checkpoint: the training math on the whole preprocessed case, the tile
    anchored at the array's origin, G by sliding window, then the same bound."""

    def __init__(self, state: dict, patch_size: Sequence[int], device: torch.device):
        self.method = state.get('method', METHOD)
        roi = state.get('roi') or {}
        self.roi = {'dilation': int(roi.get('dilation', 0)), 'soft_edge': float(roi.get('soft_edge', 0.0))}
        eps = float(state.get('eps') or 0.0)
        self.eps_bg = float(state.get('eps_bg') or 0.0) / eps if eps > 0 else 0.0  # weight of the ROI budget
        options = state.get('lc') or {}
        self.multiplicative = bool(options.get('multiplicative', False))
        self.percentiles = [float(p) for p in options.get('percentiles', state.get('percentiles', (0.5, 99.5)))]
        self.model = LabelCodedPerturbator(**state['generator_kwargs'])
        self.model.load_state_dict(state['generator_weights'])
        self.model.to(device).eval()
        self.dims = self.model.dims
        if len(patch_size) != 3 or self.dims != 3:
            raise InputError(f'{self.method}: export supports 3D configurations only, got patch {list(patch_size)}')
        self.patch_size = [int(p) for p in patch_size]
        self.device = device

    @torch.inference_mode()
    def compute_delta(self, data_norm, seg_pre, eps_norm, case):
        """delta (normalised units) = bound x tanh(P[y] + band-limited G(x, onehot(y))), bound as in training."""
        x = torch.from_numpy(np.ascontiguousarray(data_norm, dtype=np.float32))[None]
        seg = torch.from_numpy(np.ascontiguousarray(seg_pre)).float()[None]
        onehot = one_hot_labels(seg, self.model.labels)
        code = self.model.code(onehot.to(self.device), [[0] * self.dims]).float().cpu()
        if self.model.use_generator:
            g = sliding_window_unet(self.model, torch.cat([x, onehot], 1)[0].numpy(), self.patch_size, self.device)
            code = code + band_limit(torch.from_numpy(g)[None], self.model.band)
        eps = torch.as_tensor(np.asarray(eps_norm, dtype=np.float32)).view(1, -1, *([1] * self.dims))
        window = None
        if self.multiplicative:
            w = torch.tensor(intensity_window(data_norm, self.percentiles), dtype=torch.float32)
            window = [w[:, i].view(1, -1, *([1] * self.dims)) for i in (0, 1)]
        bound = lc_bound(roi_mask(seg, **self.roi), eps, eps * self.eps_bg, x, window)
        return bounded_delta(torch.tanh(code), bound)[0].numpy()
