"""What the protector trainers (VoxShield and its variants, sample-wise EM) share around nnU-Net's trainer."""
import torch

from nnunetv2_voxshield.budget import check_budget
from nnunetv2_voxshield.checkpoint import set_rng_state


class ProtectorTrainer:
    """Mixin before nnUNetTrainer: the budget (``eps``, ``eps_abs``, ``budget_mode``) checked before nnU-Net's
    __init__ (a bad one fails at once, naming the class), checkpoint_latest.pth every ``checkpoint_every`` epochs,
    the trainer's own ``log_keys`` in nnU-Net's logger, and after --c the checkpoint's RNG states at the start of the
    first epoch (``resume_rng_state``, set by the trainer's load_checkpoint)."""
    checkpoint_every = 1              # epochs between checkpoint_latest.pth (stock: 50), what --c resumes from
    log_keys = ()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        try:
            check_budget(self.eps, self.eps_abs, self.budget_mode)
        except ValueError as e:
            raise ValueError(f'{type(self).__name__}: {e}') from None
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = self.checkpoint_every
        self.resume_rng_state = None
        for key in self.log_keys:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    def on_train_epoch_start(self):
        """After --c, the first epoch starts from the checkpoint's RNG states, so that (with nnU-Net's loader in this
        process, nnUNet_n_proc_DA=0) it draws the batches, augmentations and tile phases of an uninterrupted run. Not
        under DDP: every rank would draw rank 0's batches."""
        if self.resume_rng_state is not None and not self.is_ddp:
            set_rng_state(self.resume_rng_state)
        self.resume_rng_state = None
        super().on_train_epoch_start()
