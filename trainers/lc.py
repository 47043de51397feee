"""nnUNetTrainerVoxShieldLC: a label-conditioned perturbation, delta = b * tanh(P[y] + G(x, onehot(y))) (issue 13).

Fixed label-coded patterns (a class-wise offset, a label-interior checkerboard) partly protect where every
image-only generator fails, so here the perturbation is written from the labels: a learnable code P per foreground
class, shared by all cases and tiled over the volume (random phase in training, the array's origin at export),
plus a band-limited generator G that sees the image and the one-hot labels (``nnunetv2_voxshield.lc``). It is
optimised error-minimising through the victim's own augmentation (EOT, inherited), against a surrogate that is
re-initialised every ``surrogate_reset_every`` iterations (fresh weights from (surrogate_seed, reset index), fresh
SGD state), so the code is what a fresh network learns first. L_ISC and L_SPD keep the VoxShield weights
(lambda_isc = 0.2, lambda_spd = 0.05, Eq. 6). 3D label-based configurations only (no regions).
The ``_align`` variants add cos(g_delta, g_clean) to the objective; the ``_probe`` diagnostics train only the
surrogate on a fixed code and log that cosine (``benchmarks/probe.py``).
"""
import numpy as np
import torch
from torch._dynamo import OptimizedModule

from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import \
    nnUNetTrainerNoDA as StockNoDA

from nnunetv2_voxshield.budget import roi_mask
from nnunetv2_voxshield.controls import checkerboard, class_sign
from nnunetv2_voxshield.diff_augment import differentiable, replay_rng
from nnunetv2_voxshield.distributed import unwrap
from nnunetv2_voxshield.losses import gradient_alignment, inter_slice_spectral_loss
from nnunetv2_voxshield.lc import (METHOD, LabelCodedPerturbator, intensity_window, lc_bound, one_hot_labels)
from nnunetv2_voxshield.support import background_eps, bounded_delta
from nnunetv2_voxshield.trainers.eot import nnUNetTrainerVoxShieldEOT
from nnunetv2_voxshield.trainers.epochs import epoch_variant
from nnunetv2_voxshield.trainers.eps_variants import budget_variant


class nnUNetTrainerVoxShieldLC(nnUNetTrainerVoxShieldEOT):
    """Label-conditioned VoxShield: delta = b * tanh(P[y] + G(x, onehot(y))), EOT, periodic surrogate resets (see
    the module docstring)."""
    method = METHOD
    roi_dilation = 2                  # voxels: eps in the labels dilated by this, eps_bg (inherited, 1/255) outside
    band = 2.0                        # G keeps |f| <= 0.5 / band cycles/voxel per axis (exact FFT low-pass; 1: off)
    pattern_grid = 4                  # parameters per axis of each class code
    pattern_tile = 16                 # voxels per axis of the tile the grid is upsampled to
    pattern_init_std = 1.0
    random_phase = True               # training: the tile's phase in each patch is drawn at random
    use_generator = True              # False: delta = b * tanh(P[y]) only
    multiplicative = False            # True: b x clip((x - p_low) / (p_high - p_low), 0, 1) of the case (<= b)
    surrogate_reset_every = 250       # iterations (surrogate and generator steps); 0: never
    surrogate_seed = 0
    pattern_lr = None                 # Adam rate of the class code P (None: generator_lr, as G)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.intensity_windows = None

    def build_generator(self) -> torch.nn.Module:
        """P and G (``lc.LabelCodedPerturbator``); export rebuilds it from generator_kwargs."""
        name = type(self).__name__
        if len(self.configuration_manager.patch_size) != 3:
            raise ValueError(f'{name}: 3D configurations only (got {self.configuration_name}); use 3d_fullres')
        if self.label_manager.has_regions:
            raise ValueError(f'{name}: region-based training is not supported (the class code needs labels)')
        labels = [int(k) for k in self.label_manager.foreground_labels if k != self.label_manager.ignore_label]
        self.generator_kwargs = {**self.generator_kwargs, 'foreground_labels': labels, 'band': float(self.band),
                                 'pattern_grid': int(self.pattern_grid), 'pattern_tile': int(self.pattern_tile),
                                 'pattern_init_std': float(self.pattern_init_std),
                                 'use_generator': bool(self.use_generator)}
        return LabelCodedPerturbator(**self.generator_kwargs)

    def generator_param_groups(self) -> list:
        """P at ``pattern_lr`` (if set), G at ``generator_lr``. At 1e-4, Adam moves each entry of P by at most ~1e-4
        per step, so 625 generator steps leave P (std 1 at init) where it started."""
        if self.pattern_lr is None:
            return super().generator_param_groups()
        pattern = [p for n, p in self.generator.named_parameters() if n == 'pattern']
        rest = [p for n, p in self.generator.named_parameters() if n != 'pattern']
        return [{'params': pattern, 'lr': float(self.pattern_lr)}, {'params': rest}]

    def on_train_start(self):
        """As the parent, plus each case's intensity window when ``multiplicative`` (unless resumed)."""
        super().on_train_start()
        if self.multiplicative and self.intensity_windows is None:
            identifiers = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
            dataset = self.dataset_class(self.preprocessed_dataset_folder, identifiers)
            self.intensity_windows = {k: intensity_window(np.asarray(dataset.load_case(k)[0]), self.percentiles)
                                      for k in identifiers}

    def _phases(self, batch_size: int):
        if not self.random_phase:
            return [[0, 0, 0]] * batch_size
        return torch.randint(0, int(self.pattern_tile), (batch_size, 3)).tolist()

    def perturbation(self, data: torch.Tensor, target, keys):
        """delta = b * tanh(P[y] + G(x, onehot(y))), b = lc_bound (eps in the dilated ROI, eps_bg outside)."""
        seg = target[:, :1]
        onehot = one_hot_labels(seg, self.generator_kwargs['foreground_labels'])
        pre = self.generator(data, onehot, self._phases(data.shape[0]))
        eps = self._batch_eps(keys, data)
        window = None
        if self.multiplicative:
            w = torch.tensor([self.intensity_windows[k] for k in keys], dtype=data.dtype, device=data.device)
            window = [w[:, :, i].view(*w.shape[:2], 1, 1, 1) for i in (0, 1)]
        bound = lc_bound(roi_mask(seg, dilation=self.roi_dilation, soft_edge=self.roi_soft_edge,
                                  ignore_label=self.label_manager.ignore_label), eps,
                         background_eps(eps, self.eps, self.eps_bg), data, window)
        return bounded_delta(torch.tanh(pre.float()), bound), bound

    def train_step(self, batch: dict) -> dict:
        """As the parent, after re-initialising the surrogate every ``surrogate_reset_every`` iterations."""
        k = int(self.surrogate_reset_every)
        if k > 0 and self.voxshield_iteration > 0 and self.voxshield_iteration % k == 0:
            self.reset_surrogate(self.voxshield_iteration // k)
        return super().train_step(batch)

    def reset_surrogate(self, index: int) -> None:
        """Fresh surrogate weights, seeded by (surrogate_seed, index) without touching the global RNG, and fresh
        optimiser state (the learning-rate schedule is kept)."""
        seed = int(np.random.SeedSequence([int(self.surrogate_seed), int(index)]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                    self.num_input_channels, self.label_manager.num_segmentation_heads,
                                                    self.enable_deep_supervision)
        network = unwrap(self.network)
        network = network._orig_mod if isinstance(network, OptimizedModule) else network
        network.load_state_dict(fresh.state_dict())
        self.optimizer.state.clear()
        self.print_to_log_file(f'VoxShieldLC: surrogate re-initialised (reset {index}, iteration '
                               f'{self.voxshield_iteration})')

    def voxshield_state(self) -> dict:
        """Adds the LC options; generator_weights hold P ('pattern') and G ('unet.*')."""
        return {**super().voxshield_state(), 'lc': {
            'multiplicative': bool(self.multiplicative), 'percentiles': list(self.percentiles),
            'intensity_windows': self.intensity_windows, 'random_phase': bool(self.random_phase),
            'surrogate_reset_every': int(self.surrogate_reset_every), 'surrogate_seed': int(self.surrogate_seed)}}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """As the parent, plus the intensity windows of the checkpoint."""
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = torch.load(filename_or_checkpoint, map_location='cpu', weights_only=False) \
            if isinstance(filename_or_checkpoint, str) else filename_or_checkpoint
        self.intensity_windows = (checkpoint['voxshield'].get('lc') or {}).get('intensity_windows')


class nnUNetTrainerVoxShieldLC_patternOnly(nnUNetTrainerVoxShieldLC):
    """Ablation: the class code alone, delta = b * tanh(P[y]) (no generator)."""
    use_generator = False


class nnUNetTrainerVoxShieldLC_noReg(nnUNetTrainerVoxShieldLC):
    """Ablation (issue 13.2: do L_ISC and L_SPD help here?): lambda_isc = lambda_spd = 0, so the generator minimises
    L_seg alone (Eq. 6 without its two regularisers)."""
    lambda_isc = 0.0
    lambda_spd = 0.0


class nnUNetTrainerVoxShieldLC_tile4(nnUNetTrainerVoxShieldLC):
    """A period-4 class code: one free parameter per voxel of a 4^3 tile (the band that survives stock augmentation
    best among the fixed controls), instead of a 4^3 grid upsampled to 16^3."""
    pattern_grid = 4
    pattern_tile = 4


class nnUNetTrainerVoxShieldLC_tile4_noDA(nnUNetTrainerVoxShieldLC_tile4, StockNoDA):
    """The period-4 code optimised against a surrogate without augmentation: T is stock ``nnUNetTrainerNoDA``'s
    pipeline (the paper's victim setting, where a fixed checkerboard protects at 10/255), so nothing in T erases a
    texture; patch size and mirroring come from stock NoDA itself (next in the MRO). Asks whether the objective finds
    a protecting code at all when the victim does not augment."""

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, **kwargs):
        """T = stock NoDA's pipeline made differentiable, applied in the step; loader: None."""
        self.eot_transform = differentiable(StockNoDA.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug, **kwargs))
        return None


class CheckerboardStart:
    """Mixin: P starts as the checkerboard control, s_k x atanh(0.95) x (-1)^(i+j+k) on the 4^3 tile (b tanh(P) =
    +-0.95 b), sign s_k per class as ``--method checkerboard``."""
    pattern_init_amplitude = float(np.arctanh(0.95))

    def build_generator(self) -> torch.nn.Module:
        """The parent's P and G, with P set to the signed checkerboard."""
        generator = super().build_generator()
        parity = torch.from_numpy(checkerboard((int(self.pattern_tile),) * 3)).float()
        signs = torch.tensor([class_sign(k) for k in self.generator_kwargs['foreground_labels']])
        with torch.no_grad():
            generator.pattern.copy_(signs.view(-1, 1, 1, 1, 1) * self.pattern_init_amplitude * parity)
        return generator


class nnUNetTrainerVoxShieldLC_tile4_noDA_cbInit(CheckerboardStart, nnUNetTrainerVoxShieldLC_tile4_noDA):
    """Diagnostic: ``_tile4_noDA`` with P started as the checkerboard control (``CheckerboardStart``), a code that
    protects against this victim at 10/255. If training keeps it, finding the code is what fails; if training moves
    away from it, the objective does not reward it."""


class nnUNetTrainerVoxShieldLC_tile4_fastP(nnUNetTrainerVoxShieldLC_tile4):
    """The period-4 code with its own Adam rate, 1e-2 (G stays at 1e-4), so that P can move by O(1) in a run."""
    pattern_lr = 1e-2


class nnUNetTrainerVoxShieldLC_tile4_noDA_fastP(nnUNetTrainerVoxShieldLC_tile4_noDA):
    """``_tile4_noDA`` with P at Adam rate 1e-2: can the code be found from a random start in the paper's setting?"""
    pattern_lr = 1e-2


class nnUNetTrainerVoxShieldLC_align(nnUNetTrainerVoxShieldLC_tile4_fastP):
    """The code optimised for what training on it does to the clean task: the generator minimises
    L_seg(F_s(T(x + delta))) + lambda_align cos(g_delta, g_clean) (``losses.gradient_alignment``; the same draw of T
    on x + delta and on x), so a step on the protected data moves the surrogate along a direction that does not lower
    the clean loss. The error-minimising term alone scored a protecting and a useless code the same (issue 13).
    Also logs the cosine of surrogate steps every ``align_log_every`` iterations ('voxshield_align', per epoch).
    Costs a double backward per generator step (~3x a step). L_SPD is not used (lambda_spd = 0)."""
    lambda_align = 1.0
    lambda_spd = 0.0
    align_log_every = 10              # surrogate steps: 0 = never

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger.my_fantastic_logging.setdefault('voxshield_align', [])

    def _views(self, data, delta, target):
        """T(x + delta), T(y) and T(x), T(y) under one draw of T."""
        with replay_rng() as rewind:
            x_t, y_t = self.victim_view(data + delta, target)
            rewind()
            clean_t, clean_y = self.victim_view(data, target)
        return x_t, y_t, clean_t, clean_y

    def _alignment(self, x_t, y_t, clean_t, clean_y, create_graph: bool):
        params = [p for p in self.network.parameters()]
        l_seg = self.loss(self.network(x_t), y_t)
        return l_seg, gradient_alignment(l_seg, self.loss(self.network(clean_t), clean_y), params, create_graph)

    def generator_step(self, data, target, keys) -> dict:
        """min_G L_seg + lambda_align cos + lambda_ISC L_ISC, F_s's weights untouched (its gradients discarded)."""
        self.generator_optimizer.zero_grad(set_to_none=True)
        delta, bound = self.perturbation(data, target, keys)
        x_t, y_t, clean_t, clean_y = self._views(data, delta, target)
        l_seg, cos = self._alignment(x_t, y_t, clean_t, clean_y, create_graph=self.lambda_align > 0)
        l_isc = inter_slice_spectral_loss(delta.float(), self.slice_axis)
        l_g = l_seg + self.lambda_align * cos + self.lambda_isc * l_isc
        self.update_generator(l_g)
        self.network.zero_grad(set_to_none=True)
        return {'loss': l_seg.detach().cpu().numpy(), 'l_seg': l_seg.item(), 'l_isc': l_isc.item(),
                'l_spd': np.nan, 'align': cos.item(), 'delta_over_budget': self._delta_over_budget(delta, bound)}

    def surrogate_step(self, data, target, keys) -> dict:
        """As the parent; every ``align_log_every`` steps also records cos(g_delta, g_clean) as ``'align'``."""
        out = super().surrogate_step(data, target, keys)
        every = int(self.align_log_every)
        if every > 0 and (self.voxshield_iteration - 1) % every == 0:
            with torch.no_grad():
                delta, _ = self.perturbation(data, target, keys)
            _, cos = self._alignment(*self._views(data, delta, target), create_graph=False)
            self.network.zero_grad(set_to_none=True)
            out['align'] = cos.item()
        return out

    def on_train_epoch_end(self, train_outputs):
        """As the parent, plus the epoch's mean alignment cosine logged as 'voxshield_align'."""
        values = [o['align'] for o in train_outputs if 'align' in o]
        super().on_train_epoch_end(train_outputs)
        mean = float(np.mean(values)) if values else float('nan')
        self.logger.log('voxshield_align', mean, self.current_epoch)
        self.print_to_log_file(f'VoxShieldLC_align: mean cos(g_delta, g_clean) {mean:.4f} ({len(values)} steps)')


class nnUNetTrainerVoxShieldLC_align_noDA(nnUNetTrainerVoxShieldLC_align, nnUNetTrainerVoxShieldLC_tile4_noDA):
    """``_align`` in the paper's victim setting (T = stock NoDA's pipeline)."""


class nnUNetTrainerVoxShieldLC_align_noDA_smallInit(nnUNetTrainerVoxShieldLC_align_noDA):
    """``_align_noDA`` with P started near 0 (std 0.01) and the cosine weighted 5x: at P ~ N(0, 1), tanh saturates P
    at its initial signs within an epoch (``_fastP`` and ``_align_noDA`` ended at the same code), so the signs are
    never chosen by the objective; here they are."""
    pattern_init_std = 0.01
    lambda_align = 5.0


class SurrogateOnly:
    """Mixin for the probes: no G and no generator steps (the code P stays at its start), every step a surrogate
    step, never re-initialised."""
    use_generator = False
    generator_steps_per_cycle = 0
    surrogate_reset_every = 0


class nnUNetTrainerVoxShieldLC_probe_noDA(SurrogateOnly, nnUNetTrainerVoxShieldLC_align_noDA):
    """Diagnostic: a surrogate without augmentation trains on x + a fixed random 4^3 class code, logging the cosine
    every 10 steps; with ``_cb`` the code is the protecting checkerboard. Asks whether cos(g_delta, g_clean)
    separates a code that protects from one that does not, and when."""


class nnUNetTrainerVoxShieldLC_probe_noDA_cb(CheckerboardStart, nnUNetTrainerVoxShieldLC_probe_noDA):
    """``_probe_noDA`` with the checkerboard code of ``_cbInit`` (protects this victim at 10/255 for 2 of 3 seeds)."""


class nnUNetTrainerVoxShieldLC_probe(SurrogateOnly, nnUNetTrainerVoxShieldLC_align):
    """``_probe_noDA`` through stock augmentation (T = stock nnU-Net's pipeline): the fixed random code."""


class nnUNetTrainerVoxShieldLC_probe_cb(CheckerboardStart, nnUNetTrainerVoxShieldLC_probe):
    """``_probe`` with the checkerboard code (0.83 of clean against the stock victim at 16/255, exported)."""


def _module_level(cls: type) -> type:
    cls.__module__ = __name__  # epoch_variant / budget_variant name their own modules; these classes live here
    return cls


EPOCHS = (1, 5, 10, 20)
BASES = [nnUNetTrainerVoxShieldLC, nnUNetTrainerVoxShieldLC_patternOnly, nnUNetTrainerVoxShieldLC_noReg,
         nnUNetTrainerVoxShieldLC_tile4,
         nnUNetTrainerVoxShieldLC_tile4_noDA,
         _module_level(budget_variant(nnUNetTrainerVoxShieldLC_tile4_noDA, 'eps10', 10 / 255)),
         _module_level(budget_variant(nnUNetTrainerVoxShieldLC_tile4_noDA_cbInit, 'eps10', 10 / 255)),
         nnUNetTrainerVoxShieldLC_tile4_fastP, nnUNetTrainerVoxShieldLC_tile4_noDA_fastP,
         _module_level(budget_variant(nnUNetTrainerVoxShieldLC_tile4_noDA_fastP, 'eps10', 10 / 255)),
         *[_module_level(budget_variant(nnUNetTrainerVoxShieldLC_tile4_fastP, f'eps{n}', n / 255)) for n in (10, 16)],
         *[_module_level(budget_variant(b, 'eps10', 10 / 255)) for b in (
             nnUNetTrainerVoxShieldLC_align_noDA, nnUNetTrainerVoxShieldLC_align_noDA_smallInit,
             nnUNetTrainerVoxShieldLC_probe_noDA,
             nnUNetTrainerVoxShieldLC_probe_noDA_cb)],
         *[_module_level(budget_variant(b, 'eps16', 16 / 255)) for b in (
             nnUNetTrainerVoxShieldLC_probe, nnUNetTrainerVoxShieldLC_probe_cb)],
         *[_module_level(budget_variant(nnUNetTrainerVoxShieldLC_align, f'eps{n}', n / 255)) for n in (16, 64)]]
BASES += [_module_level(budget_variant(b, f'eps{n}', n / 255)) for b in (nnUNetTrainerVoxShieldLC,
                                                                        nnUNetTrainerVoxShieldLC_noReg,
                                                                        nnUNetTrainerVoxShieldLC_tile4)
          for n in (8, 16, 64)]
BASES += [_module_level(budget_variant(nnUNetTrainerVoxShieldLC, 'paperBudget', 4 / 255, 'zscore'))]
globals().update({cls.__name__: cls for cls in BASES})
globals().update({cls.__name__: cls for cls in (_module_level(epoch_variant(b, e)) for b in BASES for e in EPOCHS)})
