"""nnUNetTrainerVoxShieldEOT_2DAware: EOT against the 3D surrogate and a 2D one (a victim may train nnU-Net 2d).

A second surrogate, nnU-Net's network of the plans' ``2d`` configuration, trains on slices (axis 0, nnU-Net's 2D
slicing axis) of the un-augmented 3D crop of x + delta, each augmented by the 2D victim's own pipeline (stock
``get_training_transforms`` for the 2D patch size, rotation and mirroring; differentiable, no deep supervision).
The generator minimises Eq. 6 plus ``weight_2d`` x the 2D surrogate's L_seg through that augmentation.
Approximation: the 2D victim crops its patches from whole slices; here from the slices of the 3D crop.
"""
import numpy as np
import torch

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_voxshield.diff_augment import augment_batch, differentiable
from nnunetv2_voxshield.trainers.eot import nnUNetTrainerVoxShieldEOT


class nnUNetTrainerVoxShieldEOT_2DAware(nnUNetTrainerVoxShieldEOT):
    """EOT VoxShield against the 3D surrogate and a 2D one trained on slices (see the module docstring)."""
    weight_2d = 1.0                   # weight of the 2D surrogate's L_seg in the generator objective
    slices_per_sample = 4             # 2D training slices drawn from each 3D crop
    configuration_2d = '2d'

    def initialize(self):
        """As the parent, plus the 2D surrogate (network of the ``2d`` configuration), its SGD, poly LR and loss."""
        super().initialize()
        if len(self.configuration_manager.patch_size) != 3:
            raise RuntimeError('2D-surrogate awareness needs a 3D configuration (the 2D surrogate sees its slices)')
        if self.configuration_2d not in self.plans_manager.available_configurations:
            raise RuntimeError(f'the plans have no {self.configuration_2d!r} configuration for the 2D surrogate; '
                               f'plan it with nnUNetv2_plan_and_preprocess -c {self.configuration_2d}')
        self.configuration_manager_2d = self.plans_manager.get_configuration(self.configuration_2d)
        self.network_2d = self.build_network_architecture(
            self.plans_manager, self.configuration_manager_2d, self.num_input_channels,
            self.label_manager.num_segmentation_heads, False).to(self.device)
        self.optimizer_2d = torch.optim.SGD(self.network_2d.parameters(), self.initial_lr,
                                            weight_decay=self.weight_decay, momentum=0.99, nesterov=True)
        self.lr_scheduler_2d = PolyLRScheduler(self.optimizer_2d, self.initial_lr, self.num_epochs)
        self.loss_2d = self._build_loss_2d()

    def _build_loss_2d(self):
        """nnU-Net's loss of the 2D configuration, without deep supervision."""
        batch_dice = self.configuration_manager_2d.batch_dice
        if self.label_manager.has_regions:
            return DC_and_BCE_loss({}, {'batch_dice': batch_dice, 'do_bg': True, 'smooth': 1e-5, 'ddp': self.is_ddp},
                                   use_ignore_label=self.label_manager.ignore_label is not None,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        return DC_and_CE_loss({'batch_dice': batch_dice, 'smooth': 1e-5, 'do_bg': False, 'ddp': self.is_ddp}, {},
                              weight_ce=1, weight_dice=1, ignore_label=self.label_manager.ignore_label,
                              dice_class=MemoryEfficientSoftDiceLoss)

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, **kwargs):
        """Also builds T_2D, the 2D victim's stock pipeline (as configure_rotation_dummyDA... sets it for 2D)."""
        patch_2d = self.configuration_manager_2d.patch_size
        angle = 15. if max(patch_2d) / min(patch_2d) > 1.5 else 180.
        stock_2d = nnUNetTrainer.get_training_transforms(patch_2d, (-angle / 180 * np.pi, angle / 180 * np.pi), None,
                                                         (0, 1), False, **kwargs)
        self.eot_transform_2d = differentiable(stock_2d)
        return super().get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                               do_dummy_2d_data_aug, **kwargs)

    def victim_view_2d(self, x: torch.Tensor, seg: torch.Tensor):
        """T_2D of ``slices_per_sample`` random axis-0 slices per sample of the un-augmented crop, on the device."""
        idx = torch.randint(0, x.shape[2], (x.shape[0], self.slices_per_sample))
        batch = torch.arange(x.shape[0])[:, None]
        x2, y2 = augment_batch(self.eot_transform_2d, x.cpu()[batch, :, idx].flatten(0, 1),
                               seg.cpu()[batch, :, idx].flatten(0, 1))
        return x2.to(self.device), y2.to(self.device)

    def train_extra_surrogates(self, x_perturbed: torch.Tensor, target) -> None:
        """One SGD step of the 2D surrogate on T_2D(slices of x + delta), like a 2D victim's step."""
        with torch.no_grad():
            x2, y2 = self.victim_view_2d(x_perturbed, target)
        self.optimizer_2d.zero_grad(set_to_none=True)
        loss = self.loss_2d(self.network_2d(x2), y2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network_2d.parameters(), 12)
        self.optimizer_2d.step()

    def extra_surrogate_loss(self, x_perturbed: torch.Tensor, target) -> torch.Tensor:
        """weight_2d x L_seg of the frozen 2D surrogate on T_2D(slices of x + delta), differentiable w.r.t. delta."""
        self.network_2d.requires_grad_(False)
        try:
            x2, y2 = self.victim_view_2d(x_perturbed, target)
            return self.weight_2d * self.loss_2d(self.network_2d(x2), y2)
        finally:
            self.network_2d.requires_grad_(True)

    def on_train_epoch_start(self):
        """As the parent, plus the 2D surrogate in train mode and its learning rate for this epoch."""
        super().on_train_epoch_start()
        self.network_2d.train()
        self.lr_scheduler_2d.step(self.current_epoch)

    def voxshield_state(self) -> dict:
        """The parent's state plus the 2D surrogate (configuration, weight, network and optimiser state)."""
        return {**super().voxshield_state(), 'surrogate_2d': {
            'configuration': self.configuration_2d, 'weight': self.weight_2d,
            'network_weights': self.network_2d.state_dict(), 'optimizer_state': self.optimizer_2d.state_dict()}}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """As the parent, plus the 2D surrogate's weights and optimiser state if the checkpoint has them."""
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False) \
            if isinstance(filename_or_checkpoint, str) else filename_or_checkpoint
        state = checkpoint['voxshield'].get('surrogate_2d')
        if state is not None:
            self.network_2d.load_state_dict(state['network_weights'])
            self.optimizer_2d.load_state_dict(state['optimizer_state'])
