"""Export-time baselines (issue 5), computed on one preprocessed case like ``perturbation.RandomSource``.

``lsp``: linearly separable perturbations (Yu et al., KDD 2022): a fixed random +-1 pattern per label class,
tiled over the volume and applied on that class's voxels at the full budget; surrogate-free, seeded by (seed, class).
``tap``: targeted adversarial poisoning (Fowl et al., NeurIPS 2021): PGD on the whole volume against a stock nnU-Net
checkpoint trained on clean data, towards class-swapped labels (k -> next foreground label, background stays).
"""
import contextlib
import io
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

from nnunetv2_voxshield.budget import roi_mask_np
from nnunetv2_voxshield.dataset_io import InputError

DEFAULT_LSP_PATCH = 8
DEFAULT_TAP_STEPS = 10
SLICES_PER_TILE = 16  # 2D surrogates: slices of axis 0 per forward pass
WHOLE_VOLUME_FACTOR = 4  # TAP: volumes up to this many patches (voxels) go through the network in one piece


def lsp_pattern(seed: int, label: int, channels: int, patch: int = DEFAULT_LSP_PATCH) -> np.ndarray:
    """The fixed +-1 pattern (channels, patch, patch, patch) of class ``label`` (LSP, Yu et al. 2022)."""
    rng = np.random.default_rng([int(seed), int(label), 0x15F])
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(channels, patch, patch, patch))


def tile_pattern(pattern: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``pattern`` (c, p, p, p) repeated from the volume's origin to cover ``shape`` (spatial)."""
    reps = [1] + [-(-int(s) // p) for s, p in zip(shape, pattern.shape[1:])]
    return np.tile(pattern, reps)[(slice(None), *[slice(0, int(s)) for s in shape])]


class LSPSource:
    """LSP (Yu et al. 2022): delta = eps * tiled pattern of class k on the voxels of class k, zero elsewhere."""
    method = 'lsp'

    def __init__(self, seed: int = 0, dims: int = 3, patch: int = DEFAULT_LSP_PATCH):
        if int(patch) < 1:
            raise InputError(f'--lsp-patch must be >= 1, got {patch}')
        self.seed, self.dims, self.patch = int(seed), dims, int(patch)
        self.roi, self.eps_bg = {'dilation': 0, 'soft_edge': 0.0}, 0.0

    def compute_delta(self, data_norm, seg_pre, eps_norm, case):
        """delta (normalised units) = eps x the tiled pattern of class k on the voxels of class k, zero elsewhere."""
        eps = np.asarray(eps_norm, dtype=np.float32).reshape(-1, *([1] * (data_norm.ndim - 1)))
        delta = np.zeros(data_norm.shape, dtype=np.float32)
        labels = np.asarray(seg_pre)[0]
        for label in np.unique(labels[labels > 0]):
            pattern = tile_pattern(lsp_pattern(self.seed, int(label), data_norm.shape[0], self.patch),
                                   data_norm.shape[1:])
            delta = np.where(labels == label, pattern * eps, delta)
        return delta.astype(np.float32)


def swap_target(seg: np.ndarray, foreground: Sequence[int]) -> np.ndarray:
    """TAP's target map: label k -> the next foreground label (cyclic), background and other values unchanged;
    a single foreground label is sent to background."""
    foreground = sorted(int(k) for k in foreground)
    target = seg.copy()
    for i, k in enumerate(foreground):
        target[seg == k] = foreground[(i + 1) % len(foreground)] if len(foreground) > 1 else 0
    return target


def _tiles(shape: Sequence[int], patch_size: Sequence[int]) -> List[tuple]:
    """Slicers (c, *spatial) covering a volume padded to at least ``patch_size``; 2D: chunks of slices of axis 0."""
    if len(patch_size) < len(shape):
        steps = compute_steps_for_sliding_window(shape[1:], patch_size, 1.0)
        return [(slice(None), slice(d, d + SLICES_PER_TILE), slice(sx, sx + patch_size[0]),
                 slice(sy, sy + patch_size[1]))
                for d in range(0, shape[0], SLICES_PER_TILE) for sx in steps[0] for sy in steps[1]]
    steps = compute_steps_for_sliding_window(shape, patch_size, 1.0)
    return [(slice(None), slice(sx, sx + patch_size[0]), slice(sy, sy + patch_size[1]), slice(sz, sz + patch_size[2]))
            for sx in steps[0] for sy in steps[1] for sz in steps[2]]


def _logits(network: torch.nn.Module, x: torch.Tensor, dims: int) -> torch.Tensor:
    """network on one tile (c, *spatial) -> (classes, *spatial); a 2D network sees the slices of axis 0 as a batch."""
    if dims == 2:
        return network(x.transpose(0, 1)).transpose(0, 1)
    return network(x[None])[0]


def network_divisor(configuration_manager) -> List[int]:
    """Total stride of nnU-Net's network per axis (a whole-volume input must be divisible by it)."""
    strides = configuration_manager.network_arch_init_kwargs.get('strides')
    if not strides:
        return [int(p) for p in configuration_manager.patch_size]
    return [int(v) for v in np.prod(np.array([np.broadcast_to(s, (len(configuration_manager.patch_size),))
                                              for s in strides]), axis=0)]


def tap_pgd(network: torch.nn.Module, data: np.ndarray, target: np.ndarray, mask: np.ndarray, eps: np.ndarray,
            patch_size: Sequence[int], steps: int = DEFAULT_TAP_STEPS, step_size: Optional[np.ndarray] = None,
            device: torch.device = torch.device('cpu'), divisor: Optional[Sequence[int]] = None,
            final_loss: bool = True) -> Tuple[np.ndarray, List[float]]:
    """Targeted PGD (Fowl et al. 2021): min_delta CE(f(x + delta), target) over the loss voxels (target >= 0), sign
    steps, delta projected to [-eps, eps] x mask after each step. The whole volume is one input (padded to a
    multiple of ``divisor``) unless it exceeds WHOLE_VOLUME_FACTOR patches (or no divisor): then patch-size tiles,
    gradients summed. Returns delta and the mean loss before each step (and after the last one if ``final_loss``)."""
    patch_size = [int(p) for p in patch_size]
    dims = len(patch_size)
    shape = (-1, *([1] * (data.ndim - 1)))
    eps_t = torch.as_tensor(np.asarray(eps, dtype=np.float32)).view(shape).to(device)
    step_t = eps_t * 2.5 / max(steps, 1) if step_size is None else \
        torch.as_tensor(np.asarray(step_size, dtype=np.float32)).view(shape).to(device)
    in_plane = data.shape[-dims:]
    whole = divisor is not None and np.prod(in_plane) <= WHOLE_VOLUME_FACTOR * np.prod(patch_size)
    new_shape, divisible = (None, [int(d) for d in divisor]) if whole else (patch_size, None)
    pad = lambda a, value, slicer=False: pad_nd_image(torch.from_numpy(np.ascontiguousarray(a)), new_shape,  # noqa
                                                      'constant', {'value': value}, slicer, divisible)
    x, revert = pad(np.asarray(data, dtype=np.float32), 0.0, True)
    y = pad(np.asarray(target, dtype=np.int64)[0], -1)
    m = pad(np.asarray(mask, dtype=np.float32)[0], 0.0)
    x, y, m = x.to(device), y.to(device), m.to(device)
    tiles = _tiles(tuple(x.shape[1:]), list(x.shape[-dims:]) if whole else patch_size)
    n_loss = max(sum(int((y[sl[1:]] >= 0).sum()) for sl in tiles), 1)  # overlapping tiles count twice
    for p in network.parameters():
        p.requires_grad_(False)
    network.eval()

    delta = torch.zeros_like(x)
    losses = []
    for step in range(steps + int(final_loss)):
        update = step < steps
        delta.requires_grad_(update)
        total = 0.0
        with torch.set_grad_enabled(update):
            for sl in tiles:
                logits = _logits(network, x[sl] + delta[sl], dims)
                loss = F.cross_entropy(logits[None].float(), y[sl[1:]][None], ignore_index=-1, reduction='sum')
                if update:
                    loss.backward()
                total += float(loss.detach())
        losses.append(total / n_loss)
        if update:
            with torch.no_grad():
                delta = torch.maximum(torch.minimum(delta - step_t * delta.grad.sign(), eps_t), -eps_t) * m
    return delta.detach().cpu()[(slice(None), *revert[1:])].numpy(), losses


def surrogate_folder(results: str, dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's model folder $nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>."""
    return os.path.join(results, dataset, f'{trainer}__{plans}__{configuration}')


def check_surrogate(folder: str, fold: str, checkpoint: str) -> str:
    """Path of the surrogate checkpoint; InputError (one line) if the model folder or checkpoint is missing."""
    for name in ('plans.json', 'dataset.json'):
        if not os.path.isfile(os.path.join(folder, name)):
            raise InputError(f'{os.path.join(folder, name)}: TAP surrogate not found (train it with nnUNetv2_train '
                             f'or name it with --surrogate-tr/-p/-c)')
    path = os.path.join(folder, f'fold_{fold}', checkpoint)
    if not os.path.isfile(path):
        raise InputError(f'{path}: TAP surrogate checkpoint not found (see --surrogate-f, --surrogate-chk)')
    return path


def load_surrogate(folder: str, fold: str, checkpoint: str, device: torch.device):
    """nnU-Net's own ``nnUNetPredictor`` loaded from a trained model folder (network without deep supervision)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    check_surrogate(folder, fold, checkpoint)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's lookup chatter
        predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=device,
                                    allow_tqdm=False)
        try:
            predictor.initialize_from_trained_model_folder(folder, (fold if fold == 'all' else int(fold),),
                                                           checkpoint)
        except (KeyError, RuntimeError, ValueError) as e:
            raise InputError(f'{os.path.join(folder, f"fold_{fold}", checkpoint)}: cannot be loaded as an nnU-Net '
                             f'checkpoint ({type(e).__name__})') from None
    if predictor.label_manager.has_regions:
        raise InputError(f'{folder}: TAP needs a label-based surrogate (region-based training is not supported)')
    predictor.network.to(device)
    return predictor


class TAPSource:
    """TAP (Fowl et al. 2021): targeted PGD against a clean surrogate towards class-swapped labels, in the ROI."""
    method = 'tap'

    def __init__(self, folder: str, fold: str, checkpoint: str, configuration_manager, device: torch.device,
                 steps: int = DEFAULT_TAP_STEPS):
        if int(steps) < 1:
            raise InputError(f'--tap-steps must be >= 1, got {steps}')
        predictor = load_surrogate(folder, fold, checkpoint, device)
        if list(predictor.configuration_manager.patch_size) != list(configuration_manager.patch_size) or \
                list(predictor.configuration_manager.spacing) != list(configuration_manager.spacing):
            raise InputError(f'{folder}: surrogate configuration (patch {predictor.configuration_manager.patch_size}'
                             f', spacing {predictor.configuration_manager.spacing}) differs from the export\'s')
        self.network, self.device, self.steps = predictor.network, device, int(steps)
        self.foreground = list(predictor.label_manager.foreground_labels)
        self.patch_size = [int(p) for p in configuration_manager.patch_size]
        self.divisor = network_divisor(configuration_manager)
        self.dims = len(self.patch_size)
        self.roi, self.eps_bg = {'dilation': 0, 'soft_edge': 0.0}, 0.0

    def compute_delta(self, data_norm, seg_pre, eps_norm, case):
        """PGD delta (normalised units, |delta| <= eps_norm in the ROI) towards the case's class-swapped target."""
        mask = roi_mask_np(seg_pre, self.roi, self.dims)
        target = swap_target(np.asarray(seg_pre).astype(np.int64), self.foreground)
        target[mask == 0] = -1  # the loss is taken on the labelled voxels, where target != label
        delta, _ = tap_pgd(self.network, data_norm, target, mask, eps_norm, self.patch_size, self.steps,
                           device=self.device, divisor=self.divisor, final_loss=False)
        return delta.astype(np.float32)
