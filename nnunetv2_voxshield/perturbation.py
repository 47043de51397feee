"""Perturbation sources for export: ``compute_delta(data_norm, seg_pre, eps_norm, case) -> delta_norm``.

All sources work on one preprocessed case (nnU-Net's normalised units, (c, *spatial)) and return a delta of the
same shape with |delta| <= eps_norm per channel, zero outside the label ROI (Eq. 3). ``generator``: the VoxShield
family's noise generator from a trainer checkpoint (sliding window with nnU-Net's Gaussian blending); ``random``:
uniform noise in the ROI at the full budget, computed at export time, seeded per case. The export-time baselines
``lsp`` and ``tap`` live in ``baselines.py``, the positive controls (offset, checkerboard, smooth; computed on the
raw arrays) in ``controls.py``; all register here.
"""
import zlib
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

from nnunetv2_voxshield.baselines import DEFAULT_LSP_PATCH, DEFAULT_TAP_STEPS, LSPSource, TAPSource
from nnunetv2_voxshield.budget import bound_perturbation, roi_mask_np
from nnunetv2_voxshield.controls import (BOUNDARY_METHODS, CONTROL_METHODS, DEFAULT_BLOCK, DEFAULT_SMOOTH_SIGMA,
                                         DEFAULT_WIDTH, BoundaryShiftSource, EdgeSource, LabelCodedSource)
from nnunetv2_voxshield.conv_code import METHOD as CONV_METHOD, ConvSource
from nnunetv2_voxshield.dataset_io import InputError
from nnunetv2_voxshield.generator import NoiseGenerator
from nnunetv2_voxshield.lc import METHOD as LC_METHOD, LCSource
from nnunetv2_voxshield.samplewise import METHOD as SAMPLEWISE_METHOD, SampleWiseSource
from nnunetv2_voxshield.umed import UMedPerturbator, clip_to_range, lbp_texture_map, umed_perturbation

DEFAULT_ROI = {'dilation': 0, 'soft_edge': 0.0}
EXPORT_TIME_METHODS = ('random', 'lsp', 'tap') + CONTROL_METHODS + (CONV_METHOD,)  # at export time, no checkpoint


class DeltaSource(Protocol):
    """What export needs of a perturbation source: its method, ROI settings, eps_bg and ``compute_delta(data_norm,
    seg_pre, eps_norm, case)``, the delta of one preprocessed case, (c, *spatial) in normalised units, |delta| <=
    eps_norm per channel."""
    method: str
    roi: dict
    eps_bg: float

    def compute_delta(self, data_norm: np.ndarray, seg_pre: np.ndarray, eps_norm: np.ndarray,
                      case: str) -> np.ndarray: ...


def _bounded(raw: np.ndarray, seg_pre: np.ndarray, eps_norm: np.ndarray, roi: dict, dims: int,
             bg_weight: float = 0.0) -> np.ndarray:
    """Eq. 3 with the trainer's scaling: clamp(raw * b, -b, b), b = eps * max(M, bg_weight).

    ``raw`` (float32, a temporary of the caller) is overwritten: ``bound_perturbation``'s operations in place, so
    a CT-sized volume needs no extra full-size copies (same values)."""
    eps = torch.as_tensor(np.asarray(eps_norm, dtype=np.float32)).view(-1, *([1] * (raw.ndim - 1)))
    weight = torch.from_numpy(roi_mask_np(seg_pre, roi, dims)).clamp_min_(bg_weight)
    bound = eps * weight
    del weight
    delta = torch.from_numpy(raw)
    if delta.dtype != torch.float32 or not raw.flags.writeable:
        return bound_perturbation(delta * bound, torch.ones_like(bound[:1]), bound).numpy()
    delta.mul_(bound)  # bound_perturbation(raw * b, 1, b): the mask of ones changes nothing
    torch.minimum(delta, bound, out=delta)
    torch.maximum(delta, bound.neg_(), out=delta)
    return raw


@torch.inference_mode()
def sliding_window(network: torch.nn.Module, data: np.ndarray, patch_size: Sequence[int], device: torch.device,
                   tile_step_size: float = 0.5) -> np.ndarray:
    """network over the whole volume (c, *spatial) with nnU-Net's tiling and Gaussian blending (float32)."""
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    x, revert = pad_nd_image(x, patch_size, 'constant', {'value': 0}, True, None)
    size = x.shape[1:]
    slicers = []
    if len(patch_size) < len(size):  # 2D network over the slices of axis 0
        steps = compute_steps_for_sliding_window(size[1:], patch_size, tile_step_size)
        for d in range(size[0]):
            for sx in steps[0]:
                for sy in steps[1]:
                    slicers.append((slice(None), d, slice(sx, sx + patch_size[0]), slice(sy, sy + patch_size[1])))
    else:
        steps = compute_steps_for_sliding_window(size, patch_size, tile_step_size)
        for sx in steps[0]:
            for sy in steps[1]:
                for sz in steps[2]:
                    slicers.append((slice(None), *[slice(s, s + p) for s, p in zip((sx, sy, sz), patch_size)]))
    gaussian = compute_gaussian(tuple(int(p) for p in patch_size), sigma_scale=1. / 8, value_scaling_factor=10,
                                dtype=torch.float32, device=torch.device('cpu'))
    out = torch.zeros(x.shape, dtype=torch.float32)
    weight = torch.zeros(size, dtype=torch.float32)
    for sl in slicers:
        pred = network(x[sl][None].to(device))[0].float().cpu()
        out[sl] += pred * gaussian
        weight[sl[1:]] += gaussian
    out /= weight
    return out[(slice(None), *revert[1:])].numpy()


class GeneratorSource:
    """G of a VoxShield-family checkpoint: delta = clamp(G(x) * eps * M, -eps, eps)."""

    def __init__(self, state: dict, patch_size: Sequence[int], device: torch.device):
        self.method = state.get('method', 'voxshield')
        self.roi = dict(DEFAULT_ROI, **(state.get('roi') or {}))
        eps = float(state.get('eps') or 0.0)
        # eps_bg is a fraction of the case's range like eps; as a weight of the ROI budget it bounds delta outside M
        self.eps_bg = float(state.get('eps_bg') or 0.0) / eps if eps > 0 else 0.0
        self.generator = NoiseGenerator(**state['generator_kwargs'])
        self.generator.load_state_dict(state['generator_weights'])
        self.generator.to(device).eval()
        self.dims = self.generator.dims
        self.patch_size = [int(p) for p in patch_size]
        self.device = device

    def compute_delta(self, data_norm, seg_pre, eps_norm, case):
        """Eq. 3: clamp(G(x) b, -b, b), b = eps_norm * max(M, eps_bg), G by sliding window over the whole case."""
        g = sliding_window(self.generator, data_norm, self.patch_size, self.device)
        return _bounded(g, seg_pre, eps_norm, self.roi, self.dims, self.eps_bg)


class UMedSource:
    """UMed-3D checkpoint: contour pattern on the ROI's contour band + LBP-bounded texture pattern inside the ROI."""
    method = 'umed'

    def __init__(self, state: dict, patch_size: Sequence[int], device: torch.device):
        options = {'band_width': 2, 'use_contour': True, 'use_texture': True, **(state.get('umed') or {})}
        self.band_width, self.use_contour, self.use_texture = (options['band_width'], options['use_contour'],
                                                               options['use_texture'])
        dilation = int((state.get('roi') or {}).get('dilation', 0))
        self.roi = {'dilation': dilation + int(self.band_width), 'soft_edge': 0.0}  # support: ROI + outer band
        self.eps_bg = 0.0
        self.slice_axis = int(state.get('slice_axis', 0))
        self.model = UMedPerturbator(state['generator_kwargs'])
        self.model.load_state_dict(state['generator_weights'])
        self.model.to(device).eval()
        self.dims = self.model.dims
        self.roi_of_training = {'dilation': dilation, 'soft_edge': 0.0}
        self.patch_size = [int(p) for p in patch_size]
        self.device = device

    def compute_delta(self, data_norm, seg_pre, eps_norm, case):
        """UMed's delta: contour pattern on the ROI's contour band plus texture pattern bounded by the LBP map."""
        contour = sliding_window(self.model.contour, data_norm, self.patch_size, self.device)
        texture = sliding_window(self.model.texture, data_norm, self.patch_size, self.device)
        lbp = np.stack([lbp_texture_map(channel, self.slice_axis) for channel in data_norm])
        roi = roi_mask_np(seg_pre, self.roi_of_training, self.dims)
        x = torch.from_numpy(np.ascontiguousarray(data_norm, dtype=np.float32))
        eps = torch.as_tensor(np.asarray(eps_norm, dtype=np.float32)).view(-1, *([1] * (x.ndim - 1)))
        tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (contour, texture, roi, lbp)]
        if self.dims == 2:  # the trainer worked on 2D slices: slices along axis 0 become the batch
            batch = [t.transpose(0, 1) for t in tensors]
            delta = umed_perturbation(*batch[:3], batch[3], eps.transpose(0, 1), self.band_width, self.use_contour,
                                      self.use_texture).transpose(0, 1)
        else:
            batch = [t[None] for t in tensors]
            delta = umed_perturbation(*batch[:3], batch[3], eps[None], self.band_width, self.use_contour,
                                      self.use_texture)[0]
        return clip_to_range(x[None], delta[None])[0].numpy()


class RandomSource:
    """Uniform noise U(-eps, eps) inside the ROI, seeded by (seed, case) so results do not depend on -np."""
    method = 'random'

    def __init__(self, seed: int = 0, dims: int = 3):
        self.seed, self.dims = int(seed), dims
        self.roi, self.eps_bg = dict(DEFAULT_ROI), 0.0

    def compute_delta(self, data_norm, seg_pre, eps_norm, case):
        """Uniform noise seeded by (seed, case), bounded as Eq. 3: |delta| <= eps_norm in the ROI, zero outside."""
        rng = np.random.default_rng([self.seed, zlib.crc32(case.encode())])
        noise = rng.uniform(-1.0, 1.0, size=data_norm.shape).astype(np.float32)
        return _bounded(noise, seg_pre, eps_norm, self.roi, self.dims)


def load_voxshield_state(checkpoint_file: str) -> dict:
    """checkpoint['voxshield'] of a VoxShield-family trainer checkpoint; InputError for anything else."""
    try:
        checkpoint = torch.load(checkpoint_file, map_location='cpu', weights_only=False)
    except FileNotFoundError:
        raise InputError(f'{checkpoint_file}: checkpoint not found') from None
    except Exception as e:  # torch raises many types for corrupt files
        raise InputError(f'{checkpoint_file}: cannot be loaded as a checkpoint ({type(e).__name__})') from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('voxshield'), dict):
        trainer = checkpoint.get('trainer_name', 'unknown trainer') if isinstance(checkpoint, dict) else 'no dict'
        raise InputError(f'{checkpoint_file}: not a VoxShield trainer checkpoint ({trainer}, no "voxshield" entry)')
    state = checkpoint['voxshield']
    for key in ('generator_kwargs', 'generator_weights'):
        if key not in state:
            raise InputError(f'{checkpoint_file}: VoxShield entry has no {key!r}')
    return state


def make_source(method: str, state: Optional[dict], configuration_manager, device: torch.device,
                seed: int = 0, options: Optional[dict] = None) -> DeltaSource:
    """The perturbation source for ``method`` (a checkpoint's own method uses its generator); ``options``: the
    baselines' settings (lsp: patch; tap: surrogate folder, fold, checkpoint, steps)."""
    dims = len(configuration_manager.patch_size)
    options = options or {}
    if method == 'random':
        return RandomSource(seed, dims)
    if method == 'lsp':
        return LSPSource(seed, dims, options.get('patch', DEFAULT_LSP_PATCH))
    if method == CONV_METHOD:
        return ConvSource(options.get('strength'), seed)
    if method in BOUNDARY_METHODS:
        return BoundaryShiftSource(method, options.get('width', DEFAULT_WIDTH), options.get('unit', 'voxels'))
    if method == 'edge':
        return EdgeSource(options.get('width', DEFAULT_WIDTH), options.get('sign', 'alternate'),
                          options.get('unit', 'voxels'))
    if method in CONTROL_METHODS:
        return LabelCodedSource(method, seed, options.get('block', DEFAULT_BLOCK),
                                options.get('sigma', DEFAULT_SMOOTH_SIGMA), options.get('sign', 'alternate'))
    if method == 'tap':
        if not options.get('surrogate'):
            raise InputError('method \'tap\' needs a surrogate model folder (--surrogate-tr)')
        return TAPSource(options['surrogate'], str(options.get('fold', '0')),
                         options.get('checkpoint', 'checkpoint_final.pth'), configuration_manager, device,
                         options.get('steps', DEFAULT_TAP_STEPS))
    if state is None:
        raise InputError(f'method {method!r} needs a trained checkpoint')
    if state.get('method') == SAMPLEWISE_METHOD:
        return SampleWiseSource(state)
    if state.get('method') == LC_METHOD:
        return LCSource(state, configuration_manager.patch_size, device)
    if state.get('method') == 'umed':
        return UMedSource(state, configuration_manager.patch_size, device)
    return GeneratorSource(state, configuration_manager.patch_size, device)



def support_rule(source, dims: int, transpose_forward: Sequence[int]) -> dict:
    """Where ``source`` may change voxels, for the manifest (``manifest.voxel_weight`` recomputes it from a label):
    raw-space controls: their band ('grow', 'shrink', 'edge') or the labelled voxels ('labels'); nnU-Net-space
    sources: the ROI ('roi', dilation and soft edge in voxels; 2D: per slice along the raw axis
    ``transpose_forward[0]``) and the background weight eps_bg / eps outside it."""
    if getattr(source, 'raw_space', False):
        if isinstance(source, BoundaryShiftSource):
            return {'rule': source.method, 'width': source.width, 'width_unit': source.width_unit,
                    'background_weight': 0.0}
        if isinstance(source, EdgeSource):
            return {'rule': 'edge', 'width': source.width, 'width_unit': source.width_unit, 'background_weight': 0.0}
        return {'rule': 'labels', 'background_weight': 0.0}  # case_protection: weight = the support
    return {'rule': 'roi', 'dilation': int(source.roi.get('dilation', 0)),
            'soft_edge': float(source.roi.get('soft_edge', 0.0)), 'unit': 'voxels', 'dims': int(dims),
            'slice_axis': int(transpose_forward[0]) if dims == 2 else None,
            'background_weight': float(source.eps_bg)}
