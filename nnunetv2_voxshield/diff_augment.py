"""nnU-Net's training augmentation made differentiable w.r.t. the image, for expectation over transformation (EOT).

The stock pipeline (``nnUNetTrainer.get_training_transforms``, batchgeneratorsv2 torch transforms) is reused as is
wherever it already propagates gradients: SpatialTransform (grid_sample / crop on the image; the segmentation is
resampled without gradients exactly as stock does), GaussianNoise, MultiplicativeBrightness, SimulateLowResolution,
Mirror, MaskImage, Convert3DTo2D/2DTo3D, RemoveLabel, regions and deep-supervision downsampling. Three are replaced
by subclasses that keep the stock parameter sampling (``get_parameters``) and change only how they are applied:

* GaussianBlur: its FFT-vs-conv benchmark deep-copies the image (fails for non-leaf tensors) and it writes the
  blurred channels back in place; out of place by direct separable convolution instead.
* Contrast, Gamma: in-place ops overwrite tensors autograd saved (min/max, pow); rewritten out of place, and
  Gamma's pow has a finite gradient at the channel minimum (base 0, gamma < 1).

``differentiable(pipeline)`` swaps them in; ``augment_batch`` applies the pipeline sample by sample like
nnUNetDataLoader does; ``replay_rng`` lets the same random transform T be applied to x + delta and to x.
"""
import contextlib
import copy
from typing import List, Tuple, Union

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform, blur_dimension
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

_GAMMA_EPS = 1e-7  # stock GammaTransform's range floor
_POW_FLOOR = 1e-12  # bases below this are treated as exactly 0 (d/db b^g is infinite at 0 for g < 1)


class DiffGaussianBlurTransform(GaussianBlurTransform):
    """GaussianBlurTransform out of place with the same sigmas, by direct separable convolution (no FFT benchmark)."""

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        selected = np.where(np.asarray(params['apply_to_channel']))[0]
        if len(selected) == 0:
            return img
        channels = list(img.unbind(0))
        for j, c in enumerate(selected):
            sigmas = params['sigmas'] if self.synchronize_channels else params['sigmas'][j]
            sub = channels[c][None]
            for d in range(img.ndim - 1):
                sub = blur_dimension(sub, sigmas[d], d, force_use_fft=False)
            channels[c] = sub[0]
        return torch.stack(channels)


class DiffContrastTransform(ContrastTransform):
    """ContrastTransform out of place: x -> (x - mean) * m + mean, clamped to the channel's [min, max]."""

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        idx, multipliers = params['apply_to_channel'], params['multipliers']
        if multipliers is None or idx.numel() == 0:
            return img
        channels = list(img.unbind(0))
        for i, c in enumerate(idx.tolist()):
            x = channels[c]
            mean = x.mean()
            y = (x - mean) * multipliers[i] + mean
            if self.preserve_range:
                y = torch.minimum(torch.maximum(y, x.min()), x.max())
            channels[c] = y
        return torch.stack(channels)


def _safe_pow(base: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """base ** gamma for base in [0, 1] with a finite gradient where base == 0 (output 0 there, as stock)."""
    positive = base > _POW_FLOOR
    return torch.where(positive, base.clamp_min(_POW_FLOOR) ** gamma, torch.zeros_like(base))


class DiffGammaTransform(GammaTransform):
    """GammaTransform out of place: optional inversion, x -> ((x - min) / range) ** g * range + min, stats kept."""

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        idx = params['apply_to_channel']
        if idx.numel() == 0:
            return img
        channels = list(img.unbind(0))
        for k, c in enumerate(idx.tolist()):
            retain, invert = bool(params['retain_stats'][k]), bool(params['invert_image'][k])
            x = -channels[c] if invert else channels[c]
            if retain:
                mean, std = x.mean(), x.std()
            minm, maxm = x.min(), x.max()
            rnge = maxm - minm
            y = _safe_pow((x - minm) / rnge.clamp_min(_GAMMA_EPS), params['gamma'][k]) * rnge + minm
            if retain:
                y = (y - y.mean()) * (std / y.std().clamp_min(_GAMMA_EPS)) + mean
            channels[c] = -y if invert else y
        return torch.stack(channels)


REPLACEMENTS = {GaussianBlurTransform: DiffGaussianBlurTransform, ContrastTransform: DiffContrastTransform,
                GammaTransform: DiffGammaTransform}


def differentiable(transform: BasicTransform) -> BasicTransform:
    """A copy of ``transform`` (Compose / RandomTransform trees included) with the non-differentiable stock
    transforms replaced by their Diff* subclasses; parameters, ranges and probabilities are kept."""
    if isinstance(transform, ComposeTransforms):
        new = copy.copy(transform)
        new.transforms = [differentiable(t) for t in transform.transforms]
        return new
    if isinstance(transform, RandomTransform):
        new = copy.copy(transform)
        new.transform = differentiable(transform.transform)
        return new
    cls = REPLACEMENTS.get(type(transform))
    if cls is None:
        return transform
    new = cls.__new__(cls)
    new.__dict__.update(copy.deepcopy(transform.__dict__))
    return new


Target = Union[torch.Tensor, List[torch.Tensor]]


def augment_batch(transform: BasicTransform, data: torch.Tensor, seg: torch.Tensor) -> Tuple[torch.Tensor, Target]:
    """T applied per sample (b, c, *spatial), collated like nnUNetDataLoader (lists for deep supervision)."""
    images, segs = [], []
    for b in range(data.shape[0]):
        out = transform(image=data[b].clone(), segmentation=seg[b].clone())
        images.append(out['image'])
        segs.append(out['segmentation'])
    if isinstance(segs[0], (list, tuple)):
        return torch.stack(images), [torch.stack(s) for s in zip(*segs)]
    return torch.stack(images), torch.stack(segs)


@contextlib.contextmanager
def replay_rng():
    """Yields ``rewind()``: calling it resets numpy's and torch's global RNGs to their state at entry, so the next
    transform call samples the same T again; on exit the RNGs are where the last run left them."""
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def rewind():
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)

    yield rewind
