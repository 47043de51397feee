"""Sample-wise error-minimising noise (Huang et al. 2021, arXiv 2101.04898, "Unlearnable Examples"): the math.

One delta per training case at preprocessed resolution (the full case, not a patch), optimised inside the min-min
loop min_theta E[min_delta L(f(x + delta), y)], |delta| <= b: the surrogate trains on x + delta, and delta takes
signed gradient steps that *lower* the surrogate's loss (PGD with the sign of the gradient, then projection onto the
box [-b, b], as ``PerturbationTool.min_min_attack`` of the authors' code). b is the per-voxel bound of the other
trainers: eps inside the ROI (foreground labels; the ignore label excluded), eps_bg outside (``support``), both in
nnU-Net's normalised units of the case (``case_budgets``). Huang et al. also clip x + delta to the image range [0, 1];
here export does that in raw units (``case_protection``).

* ``CropLoader``: nnU-Net's loader that also returns each sample's crop box in case coordinates, so a patch's delta
  is the same crop of the case's delta (``crop_delta`` / ``insert_delta``; outside the case: zero, not stored).
* ``DeltaStore``: the deltas of all training cases (CPU, float32), initialised U(-b, b) as Huang et al., seeded per
  case; stored whole in the checkpoint (``state['deltas']``) so ``--c`` resumes them exactly.
* ``pgd_step``: one min-min step of delta on a fixed batch.
* ``SampleWiseSource``: the export source, the checkpoint's delta of the case, clamped to the export budget.
"""
import contextlib
import zlib
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunetv2_voxshield.budget import roi_mask
from nnunetv2_voxshield.dataset_io import InputError
from nnunetv2_voxshield.support import support_bound

METHOD = 'em_samplewise'


class CropLoader(nnUNetDataLoader):
    """nnUNetDataLoader whose batches also hold ``'bbox'``: per sample, [[lb, ub], ...] of the crop on every spatial
    axis of the case (2D configurations: the slice axis too, with ub = lb + 1), as ``get_bbox`` drew it."""

    def get_bbox(self, *args, **kwargs):
        """nnU-Net's crop box, also recorded for the batch's ``'bbox'``."""
        lbs, ubs = super().get_bbox(*args, **kwargs)
        self._bboxes.append([[int(a), int(b)] for a, b in zip(lbs, ubs)])
        return lbs, ubs

    def generate_train_batch(self):
        """nnU-Net's batch plus ``'bbox'``: the crop box of each sample."""
        self._bboxes = []
        batch = super().generate_train_batch()
        batch['bbox'] = self._bboxes
        return batch


@contextlib.contextmanager
def crop_loaders(trainer_module):
    """Inside the block, ``nnUNetTrainer.get_dataloaders`` builds ``CropLoader``s (its module's global is swapped)."""
    original = trainer_module.nnUNetDataLoader
    trainer_module.nnUNetDataLoader = CropLoader
    try:
        yield
    finally:
        trainer_module.nnUNetDataLoader = original


def _overlap(bbox: Sequence[Sequence[int]], shape: Sequence[int]):
    """Slices of the case and of the patch where the crop box and the case overlap."""
    case, patch = [], []
    for (lb, ub), n in zip(bbox, shape):
        lo, hi = max(lb, 0), min(ub, n)
        case.append(slice(lo, max(lo, hi)))
        patch.append(slice(lo - lb, max(lo, hi) - lb))
    return tuple(case), tuple(patch)


def crop_delta(delta: torch.Tensor, bbox: Sequence[Sequence[int]]) -> torch.Tensor:
    """The patch (c, *box size) of ``delta`` (c, *case shape) under ``bbox``, zero where the box leaves the case
    (as nnU-Net pads the image with 0 there)."""
    out = delta.new_zeros((delta.shape[0], *[ub - lb for lb, ub in bbox]))
    case, patch = _overlap(bbox, delta.shape[1:])
    out[(slice(None), *patch)] = delta[(slice(None), *case)]
    return out


def inside_case(shape: Sequence[int], bbox: Sequence[Sequence[int]]) -> torch.Tensor:
    """(1, *box size) float mask: 1 where the crop box lies inside a case of spatial ``shape``, 0 in the padding."""
    out = torch.zeros((1, *[ub - lb for lb, ub in bbox]))
    out[(slice(None), *_overlap(bbox, shape)[1])] = 1
    return out


def insert_delta(delta: torch.Tensor, bbox: Sequence[Sequence[int]], patch: torch.Tensor) -> None:
    """Write ``patch`` back into ``delta`` (in place); the part outside the case is dropped."""
    case, inside = _overlap(bbox, delta.shape[1:])
    delta[(slice(None), *case)] = patch[(slice(None), *inside)].to(delta.dtype)


def case_bound(seg: torch.Tensor, eps: torch.Tensor, eps_bg: torch.Tensor, labels: Sequence[int],
               dilation: int = 0) -> torch.Tensor:
    """b = max(eps * M, eps_bg) with M the union of ``labels`` (the foreground without the ignore label), dilated;
    seg (b, 1, *spatial), eps and eps_bg (b, c, 1, ...)."""
    mask = roi_mask(seg.float(), foreground_labels=[int(k) for k in labels], dilation=dilation)
    return support_bound(mask, eps, eps_bg)


def full_case_bound(seg_pre, eps_norm, bg_weight: float, labels: Sequence[int], dilation: int = 0,
                    dims: int = 3) -> torch.Tensor:
    """``case_bound`` of a whole preprocessed case: seg (1, *shape), eps_norm (c,) -> b (c, *shape), with eps_bg =
    bg_weight * eps; 2D configurations: slice by slice along axis 0, as their patches are."""
    seg = torch.as_tensor(np.ascontiguousarray(seg_pre)).float()
    seg = seg.transpose(0, 1) if dims == 2 else seg[None]
    eps = torch.as_tensor(np.asarray(eps_norm, dtype=np.float32)).view(1, -1, *([1] * (seg.ndim - 2)))
    bound = case_bound(seg, eps, eps * float(bg_weight), labels, dilation)
    return bound.transpose(0, 1).contiguous() if dims == 2 else bound[0]


def case_seed(seed: int, key: str) -> int:
    """A seed from (seed, case id): the same initial delta of a case whatever order cases are initialised in."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(key.encode())]).generate_state(1)[0])


class DeltaStore:
    """The deltas of the training cases, key -> (c, *preprocessed shape) float32 on the CPU."""

    def __init__(self, deltas: Optional[Dict[str, torch.Tensor]] = None):
        self.deltas = dict(deltas or {})

    def initialise(self, key: str, bound: torch.Tensor, seed: int) -> None:
        """delta ~ U(-b, b) (Huang et al.'s start), b (c, *shape) the case's bound; seeded by (seed, key)."""
        generator = torch.Generator().manual_seed(case_seed(seed, key))
        noise = torch.rand(bound.shape, generator=generator, dtype=torch.float32) * 2 - 1
        self.deltas[key] = (noise * bound.float().cpu()).contiguous()

    def crop(self, keys: Sequence[str], bboxes, two_d: bool = False) -> torch.Tensor:
        """The batch's delta patches (b, c, *patch); ``two_d``: drop the slice axis as nnU-Net's 2D loader does."""
        patches = [crop_delta(self.deltas[k], box) for k, box in zip(keys, bboxes)]
        return torch.stack([p[:, 0] if two_d else p for p in patches])

    def inside(self, keys: Sequence[str], bboxes, two_d: bool = False) -> torch.Tensor:
        """(b, 1, *patch) masks of the part of each crop that lies inside its case (no delta is stored outside)."""
        masks = [inside_case(self.deltas[k].shape[1:], box) for k, box in zip(keys, bboxes)]
        return torch.stack([m[:, 0] if two_d else m for m in masks])

    def put(self, keys: Sequence[str], bboxes, patches: torch.Tensor, two_d: bool = False) -> None:
        """Write the batch's patches back (a case twice in a batch: the later sample wins where they overlap)."""
        for k, box, p in zip(keys, bboxes, patches.detach().cpu()):
            insert_delta(self.deltas[k], box, p[:, None] if two_d else p)


def pgd_step(loss_fn: Callable[[torch.Tensor], torch.Tensor], delta: torch.Tensor, bound: torch.Tensor,
             step: torch.Tensor):
    """One min-min step (Huang et al. 2021, sample-wise noise): delta <- clip_b(delta - step * sign(grad_delta L)).

    ``loss_fn(delta)`` is the surrogate's loss on x + delta (its weights frozen by the caller). Returns the new delta
    (detached) and the loss before the step."""
    delta = delta.detach().requires_grad_(True)
    loss = loss_fn(delta)
    grad, = torch.autograd.grad(loss, delta)
    with torch.no_grad():
        new = torch.maximum(torch.minimum(delta - step * grad.sign(), bound), -bound)
    return new.detach(), float(loss.detach())


class SampleWiseSource:
    """Export source of an ``em_samplewise`` checkpoint: the case's trained delta (preprocessed geometry, normalised
    units), clamped to the export's per-voxel bound (eps_norm inside the ROI, eps_bg outside, as in training).
    Export maps it to raw geometry and units (``case_protection``) like every other source."""
    method = METHOD

    def __init__(self, state: dict):
        roi = state.get('roi') or {}
        labels = [int(k) for k in state['foreground_labels']]
        # case_protection's final clip in raw units uses this ROI too (the ignore label stays outside it)
        self.roi = {'dilation': int(roi.get('dilation', 0)), 'soft_edge': 0.0, 'foreground_labels': labels}
        eps = float(state.get('eps') or 0.0)
        self.eps_bg = float(state.get('eps_bg') or 0.0) / eps if eps > 0 else 0.0  # weight of the ROI budget
        self.deltas = state['deltas']
        self.dims = int(state.get('dims', 3))

    def compute_delta(self, data_norm, seg_pre, eps_norm, case):
        """The case's trained delta clamped to the export's bound; InputError if the checkpoint has no delta for the
        case or one of another shape."""
        delta = self.deltas.get(case)
        if delta is None:
            raise InputError(f'{case}: the checkpoint holds no delta for this case (deltas exist for the training '
                             f'cases of the fold only; train fold "all" to protect every case)')
        if tuple(delta.shape) != tuple(data_norm.shape):
            raise InputError(f'{case}: the checkpoint\'s delta has shape {tuple(delta.shape)}, the preprocessed case '
                             f'{tuple(data_norm.shape)} (export with the plans and configuration of the training)')
        bound = full_case_bound(seg_pre, eps_norm, self.eps_bg, self.roi['foreground_labels'], self.roi['dilation'],
                                self.dims)
        return torch.maximum(torch.minimum(delta.float(), bound), -bound).numpy()
