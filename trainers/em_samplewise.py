"""nnUNetTrainerEMSampleWise: sample-wise error-minimising noise (Huang et al. 2021, arXiv 2101.04898) in nnU-Net.

One delta per training case at preprocessed resolution (``samplewise.DeltaStore``), kept in the checkpoint. Iterations
alternate: ``surrogate_steps_per_cycle`` nnU-Net steps of the surrogate on x + delta, then ``pgd_batches_per_cycle``
batches whose deltas take ``pgd_steps`` signed gradient steps of ``pgd_step_fraction`` x b down the frozen
surrogate's loss (``samplewise.pgd_step``). The authors' ``sample_wise_perturbation`` trains 10 surrogate batches,
then runs 20 steps of eps/10 on every training sample; with random patches there is no pass over "every sample",
so the default is 1 : 1 batch by batch (as the VoxShield trainers), 10 steps. The loader only crops (and reports
each crop box, ``samplewise.CropLoader``), so a patch's delta is the same crop of its case's delta. Huang et al.
generate the noise without augmentation (``no_train_augments``): here T is stock NoDA's pipeline (the final patch, no
mirroring); the EOT form applies stock nnU-Net's augmentation (``diff_augment``) after the delta, as
``nnUNetTrainerVoxShieldEOT``. Stop rule (theirs: train accuracy on the
perturbed data >= 99%): when an epoch's mean surrogate loss on the perturbed data (nnU-Net's train_loss, Dice + CE)
falls below ``stop_loss``, training ends after that epoch and nnU-Net writes checkpoint_final as usual. Checkpoints
as the other protectors (``checkpoint.save_atomic``): nnU-Net's entries, the deltas and the RNG states in one dict
written once, checkpoint_latest every epoch, no checkpoint_best (the surrogate's Dice says nothing about protection).
"""
import sys
from typing import List

import numpy as np
import torch
from torch import autocast

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_voxshield.budget import DEFAULT_BUDGET_MODE, DEFAULT_EPS, DEFAULT_PERCENTILES
from nnunetv2_voxshield.diff_augment import augment_batch, differentiable
from nnunetv2_voxshield.samplewise import METHOD, DeltaStore, case_bound, crop_loaders, full_case_bound, pgd_step
from nnunetv2_voxshield.trainers.epochs import epoch_variant
from nnunetv2_voxshield.trainers.eps_variants import budget_variant
from nnunetv2_voxshield.trainers.protector import ProtectorTrainer

LOG_KEYS = ('em_pgd_loss', 'em_delta_over_budget')


class nnUNetTrainerEMSampleWise(ProtectorTrainer, nnUNetTrainer):
    """Sample-wise error-minimising noise (Huang et al. 2021): one delta per training case, min-min PGD against
    nnU-Net's network as surrogate (see the module docstring)."""
    method = METHOD
    eps = DEFAULT_EPS                 # fraction of the case's budget window (budget_mode), per channel
    budget_mode = DEFAULT_BUDGET_MODE
    eps_abs = None                    # absolute budget in raw units instead of eps
    percentiles = DEFAULT_PERCENTILES
    eps_bg = 0.0                      # budget outside the ROI, fraction of the case's window (0: delta zero there)
    roi_dilation = 0                  # voxels
    pgd_steps = 10                    # signed gradient steps per PGD batch
    pgd_step_fraction = 0.1           # step = fraction x b (eps/10 inside the ROI, as Huang et al.)
    surrogate_steps_per_cycle = 1
    pgd_batches_per_cycle = 1
    stop_loss = -0.9                  # stop after an epoch whose mean surrogate loss (Dice + CE, >= -1) is below this
    delta_seed = 0                    # initial deltas U(-b, b), seeded by (delta_seed, case id)
    log_keys = LOG_KEYS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.case_budgets = self.deltas = self.victim_transform = None
        self.em_iteration, self.em_stopped = 0, False

    # ------------------------------------------------------------------ data: crops with their boxes, T in the step
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """As stock nnUNetTrainerNoDA: the loader crops the final patch, no mirroring (Huang et al.: no DA)."""
        rotation_for_DA, do_dummy_2d_data_aug, _, _ = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation_for_DA, do_dummy_2d_data_aug, self.configuration_manager.patch_size, None

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, **kwargs):
        """T = stock NoDA's pipeline (labels and deep-supervision targets only), applied in the step; loader: None."""
        self.victim_transform = differentiable(nnUNetTrainer.get_validation_transforms(
            deep_supervision_scales, kwargs.get('is_cascaded', False), kwargs.get('foreground_labels'),
            kwargs.get('regions'), kwargs.get('ignore_label')))
        return None

    def get_dataloaders(self):
        """nnU-Net's loaders built with ``samplewise.CropLoader``, so each batch holds its crop boxes."""
        with crop_loaders(sys.modules[nnUNetTrainer.__module__]):
            return super().get_dataloaders()

    def victim_view(self, x: torch.Tensor, seg: torch.Tensor):
        """T(x), T(y) per sample on the CPU (as nnU-Net's loader), then to the device."""
        x_t, seg_t = augment_batch(self.victim_transform, x.cpu(), seg.cpu())
        seg_t = [s.to(self.device) for s in seg_t] if isinstance(seg_t, list) else seg_t.to(self.device)
        return x_t.to(self.device), seg_t

    # ------------------------------------------------------------------ budgets and deltas
    @property
    def roi_labels(self) -> List[int]:
        """The ROI's labels: the foreground, without the ignore label."""
        return [int(k) for k in self.label_manager.foreground_labels if k != self.label_manager.ignore_label]

    @property
    def bg_weight(self) -> float:
        """eps_bg / eps: the bound outside the ROI relative to inside (0 with eps_abs or without eps_bg)."""
        return float(self.eps_bg) / float(self.eps) if self.eps_bg > 0 and self.eps_abs is None else 0.0

    def on_train_start(self):
        """As nnU-Net's, then the case budgets and the initial deltas (unless resumed); refuses DDP."""
        if self.is_ddp:  # each rank would update its own copy of the deltas, and only rank 0's would be saved
            raise RuntimeError(f'{type(self).__name__}: multi-GPU (DDP) training is not supported; train on one device')
        super().on_train_start()  # ProtectorTrainer: the checkpoint note and the case budgets (unless resumed)
        if self.deltas is None:
            self.deltas = self._initial_deltas()

    def _initial_deltas(self) -> DeltaStore:
        """U(-b, b) over every training case of the fold, b from the whole case's labels (Huang et al.'s start)."""
        keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, keys)
        store, dims = DeltaStore(), len(self.configuration_manager.patch_size)
        for key in keys:
            _, seg, _, _ = dataset.load_case(key)
            bound = full_case_bound(np.asarray(seg)[:1], self.case_budgets[key]['eps_norm'], self.bg_weight,
                                    self.roi_labels, self.roi_dilation, dims)
            store.initialise(key, bound, self.delta_seed)
        return store

    def _batch_bound(self, keys, target: torch.Tensor) -> torch.Tensor:
        """Per-voxel bound of the batch's crops, (b, c, *patch): eps in the ROI, eps_bg outside, 0 off the case."""
        eps = torch.tensor([self.case_budgets[k]['eps_norm'] for k in keys], dtype=torch.float32)
        eps = eps.view(*eps.shape, *([1] * (target.ndim - 2)))
        return case_bound(target[:, :1], eps, eps * self.bg_weight, self.roi_labels, self.roi_dilation)

    # ------------------------------------------------------------------ the min-min loop
    def train_step(self, batch: dict) -> dict:
        """A surrogate step on x + delta, or a PGD batch that updates the batch's deltas (ratio set per cycle)."""
        keys, boxes, target = batch['keys'], batch['bbox'], batch['target']
        two_d = len(self.configuration_manager.patch_size) == 2
        bound = self._batch_bound(keys, target) * self.deltas.inside(keys, boxes, two_d)  # 0 in the padding
        delta = torch.maximum(torch.minimum(self.deltas.crop(keys, boxes, two_d), bound), -bound)
        cycle = self.surrogate_steps_per_cycle + self.pgd_batches_per_cycle
        is_pgd = self.em_iteration % cycle >= self.surrogate_steps_per_cycle
        self.em_iteration += 1
        if not is_pgd:
            return self.surrogate_step(batch['data'], target, delta, bound)
        delta, out = self.pgd_batch(batch['data'], target, delta, bound)
        self.deltas.put(keys, boxes, delta, two_d)
        return out

    def surrogate_step(self, data, target, delta, bound) -> dict:
        """nnU-Net's own training step on T(x + delta), T(y)."""
        with torch.no_grad():
            x_t, y_t = self.victim_view(data + delta, target)
        out = nnUNetTrainer.train_step(self, {'data': x_t, 'target': y_t})
        return {**out, 'kind': 'surrogate', 'delta_over_budget': _over_budget(delta, bound)}

    def pgd_batch(self, data, target, delta, bound):
        """``pgd_steps`` min-min steps on the batch's deltas, the surrogate frozen (eval mode, as Huang et al.); each
        step draws its own T (EOT form: expectation over the augmentation)."""
        def loss_fn(d):
            x_t, y_t = self.victim_view(data + d, target)
            with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
                return self.loss(self.network(x_t), y_t)

        step, losses = self.pgd_step_fraction * bound, []
        self.network.eval()
        self.network.requires_grad_(False)
        try:
            for _ in range(self.pgd_steps):
                delta, loss = pgd_step(loss_fn, delta, bound, step)
                losses.append(loss)
        finally:
            self.network.requires_grad_(True)
            self.network.train()
        return delta, {'loss': np.float32(losses[-1] if losses else np.nan), 'kind': 'pgd',
                       'pgd_loss': float(np.mean(losses)) if losses else np.nan,
                       'delta_over_budget': _over_budget(delta, bound)}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        """train_loss = the surrogate steps' mean loss on the perturbed data; the stop rule reads it."""
        surrogate = [{'loss': o['loss']} for o in train_outputs if o['kind'] == 'surrogate']
        super().on_train_epoch_end(surrogate or [{'loss': np.float32(np.nan)}])
        pgd = [o['pgd_loss'] for o in train_outputs if o['kind'] == 'pgd']
        over = float(np.max([o['delta_over_budget'] for o in train_outputs]))
        self.logger.log('em_pgd_loss', float(np.mean(pgd)) if pgd else np.nan, self.current_epoch)
        self.logger.log('em_delta_over_budget', over, self.current_epoch)
        train_loss = float(self.logger.get_value('train_losses', step=-1))
        self.print_to_log_file('EM sample-wise: surrogate loss %.4f  PGD loss %.4f  max|delta|/bound %.3f' % (
            train_loss, self.logger.get_value('em_pgd_loss', step=-1), over))
        if train_loss < self.stop_loss:
            self.em_stopped = True
            self.print_to_log_file(f'EM sample-wise: stop rule met (surrogate loss {train_loss:.4f} < stop_loss '
                                   f'{self.stop_loss}); training ends after epoch {self.current_epoch}')

    def run_training(self):
        """nnU-Net's loop (``nnUNetTrainer.run_training``), left after the epoch that meets the stop rule."""
        self.on_train_start()
        for _ in range(self.current_epoch, self.num_epochs):
            if self.em_stopped:
                break
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.on_train_end()

    # ------------------------------------------------------------------ checkpoint: the deltas travel with it
    def voxshield_state(self) -> dict:
        """What export needs (the deltas, budget, support) and what --c needs to resume exactly. No generator:
        ``generator_kwargs`` holds only the input channels export checks."""
        return {'method': self.method, 'generator_kwargs': {'in_channels': self.num_input_channels},
                'generator_weights': {}, 'deltas': self.deltas.deltas if self.deltas is not None else {},
                'eps': self.eps, 'eps_abs': self.eps_abs, 'percentiles': list(self.percentiles),
                'budget_mode': self.budget_mode, 'eps_bg': float(self.eps_bg),
                'roi': {'dilation': int(self.roi_dilation), 'soft_edge': 0.0}, 'foreground_labels': self.roi_labels,
                'dims': len(self.configuration_manager.patch_size), 'case_budgets': self.case_budgets,
                'iteration': self.em_iteration, 'stopped': self.em_stopped, 'stop_loss': float(self.stop_loss),
                'delta_seed': int(self.delta_seed),
                'pgd': {'steps': int(self.pgd_steps), 'step_fraction': float(self.pgd_step_fraction),
                        'surrogate_steps_per_cycle': int(self.surrogate_steps_per_cycle),
                        'pgd_batches_per_cycle': int(self.pgd_batches_per_cycle)}}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """As nnU-Net's, plus the deltas, case budgets, iteration, stop flag and RNG states of the checkpoint."""
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = torch.load(filename_or_checkpoint, map_location='cpu', weights_only=False) \
            if isinstance(filename_or_checkpoint, str) else filename_or_checkpoint
        state = checkpoint.get('voxshield')
        if not isinstance(state, dict) or state.get('method') != self.method:
            raise RuntimeError(f'{filename_or_checkpoint} is not a {self.method} checkpoint (no deltas inside)')
        self.deltas = DeltaStore(state['deltas'])
        self.case_budgets = state['case_budgets']
        self.em_iteration, self.em_stopped = int(state['iteration']), bool(state['stopped'])
        self.resume_rng_state = checkpoint.get('rng_state')


def _over_budget(delta: torch.Tensor, bound: torch.Tensor) -> float:
    return float((delta.detach().abs() / bound.clamp_min(1e-12)).max())


class nnUNetTrainerEMSampleWiseEOT(nnUNetTrainerEMSampleWise):
    """The EOT form: the loader crops stock's initial (larger) patch, T = stock nnU-Net's training augmentation made
    differentiable, applied after the delta (surrogate and PGD steps); support as VoxShield-EOT (eps_bg = 1/255)."""
    method = METHOD
    eps_bg = 1 / 255

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Stock nnU-Net's (not NoDA's): the loader crops the initial, larger patch; mirroring as stock."""
        return nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, **kwargs):
        """T = stock nnU-Net's training augmentation made differentiable, applied in the step; loader: None."""
        self.victim_transform = differentiable(nnUNetTrainer.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug, **kwargs))
        return None


def _module_level(cls: type) -> type:
    cls.__module__ = __name__  # epoch_variant / budget_variant name their own modules; these classes live here
    return cls


EPOCHS = (1, 5, 10, 20)
BASES = [nnUNetTrainerEMSampleWise, nnUNetTrainerEMSampleWiseEOT]
BASES += [_module_level(budget_variant(b, f'eps{n}', n / 255)) for b in BASES[:2] for n in (10, 16)]
globals().update({cls.__name__: cls for cls in BASES})
globals().update({cls.__name__: cls for cls in (_module_level(epoch_variant(b, e)) for b in BASES for e in EPOCHS)})
