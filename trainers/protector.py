"""What the protector trainers (VoxShield and its variants, sample-wise EM) share around nnU-Net's trainer."""
import os

import torch

from nnunetv2_voxshield.budget import check_budget
from nnunetv2_voxshield.checkpoint import rng_state, save_atomic, stock_entries
from nnunetv2_voxshield.case_budgets import budgets_from_preprocessed, compute_case_budgets, raw_dataset_folder_or_none
from nnunetv2_voxshield.checkpoint import set_rng_state

NOT_WRITTEN = 'checkpoint_best.pth'  # chosen by the surrogate's pseudo Dice, which says nothing about protection
SKIP_VALIDATION = 'VOXSHIELD_SKIP_VALIDATION'  # 1: no final validation (the export reads checkpoint_final.pth only)


def skip_validation() -> bool:
    """Whether ``VOXSHIELD_SKIP_VALIDATION`` (0, the default, or 1) asks to skip nnU-Net's final validation."""
    value = os.environ.get(SKIP_VALIDATION, '0')
    if value not in ('0', '1'):
        raise ValueError(f'{SKIP_VALIDATION}={value!r}: expected 0 or 1')
    return value == '1'


class ProtectorTrainer:
    """Mixin before nnUNetTrainer: the budget (``eps``, ``eps_abs``, ``budget_mode``) checked before nnU-Net's
    __init__ (a bad one fails at once, naming the class), checkpoint_latest.pth every ``checkpoint_every`` epochs,
    the trainer's own ``log_keys`` in nnU-Net's logger, and after --c the checkpoint's RNG states at the start of the
    first epoch (``resume_rng_state``, set by the trainer's load_checkpoint); each case's budget from its raw image;
    one atomic checkpoint file with the trainer's ``voxshield_state()``; nnU-Net's final validation unless
    ``VOXSHIELD_SKIP_VALIDATION=1`` (it scores the surrogate, and with fold ``all`` predicts every training case)."""
    checkpoint_every = 1              # epochs between checkpoint_latest.pth (stock: 50), what --c resumes from
    log_keys = ()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        try:
            check_budget(self.eps, self.eps_abs, self.budget_mode)
            self.skip_validation = skip_validation()
        except ValueError as e:
            raise ValueError(f'{type(self).__name__}: {e}') from None
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = self.checkpoint_every
        self.resume_rng_state = None
        for key in self.log_keys:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    def on_train_start(self):
        """As nnU-Net's, then a log line on the checkpoints and, unless resumed, the per-case budgets."""
        super().on_train_start()
        self.print_to_log_file(f'{NOT_WRITTEN} is not written for protectors (the surrogate\'s Dice says nothing '
                               f'about protection); checkpoint_latest.pth every {self.save_every} epoch(s), '
                               f'checkpoint_final.pth at the end')
        if self.case_budgets is None:
            self.case_budgets = self._compute_case_budgets()

    def on_train_epoch_start(self):
        """After --c, the first epoch starts from the checkpoint's RNG states, so that (with nnU-Net's loader in this
        process, nnUNet_n_proc_DA=0) it draws the batches, augmentations and tile phases of an uninterrupted run. Not
        under DDP: every rank would draw rank 0's batches."""
        if self.resume_rng_state is not None and not self.is_ddp:
            set_rng_state(self.resume_rng_state)
        self.resume_rng_state = None
        super().on_train_epoch_start()

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's, unless ``VOXSHIELD_SKIP_VALIDATION=1``: then a log line and no validation folder."""
        if self.skip_validation:
            self.print_to_log_file(f'final validation skipped ({SKIP_VALIDATION}=1): it scores the surrogate, not the '
                                   f'protection; the export reads checkpoint_final.pth only')
            return
        super().perform_actual_validation(save_probabilities)

    def _compute_case_budgets(self) -> dict:
        """{case: budget} of the fold's training cases from their raw images (case_budgets.compute_case_budgets);
        without the raw dataset, approximated from the preprocessed (normalised) images, with a warning."""
        identifiers = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
        raw_folder = raw_dataset_folder_or_none(self.plans_manager.dataset_name)
        if raw_folder is not None:
            return compute_case_budgets(raw_folder, self.dataset_json, self.plans_manager, self.configuration_manager,
                                        identifiers, self.eps, self.eps_abs, self.percentiles, self.budget_mode)
        self.print_to_log_file('WARNING: nnUNet_raw dataset not found; budgets approximated from the '
                               'preprocessed (normalised) images')
        dataset = self.dataset_class(self.preprocessed_dataset_folder, identifiers)
        return budgets_from_preprocessed(dataset, identifiers, self.eps, self.percentiles, self.budget_mode)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's entries, the trainer's ``voxshield_state()`` and the RNG states in one dict, written once and
        atomically (``checkpoint.save_atomic``): a kill at any moment leaves the previous checkpoint or this one. No
        checkpoint_best.pth (``NOT_WRITTEN``)."""
        if self.local_rank != 0 or os.path.basename(filename) == NOT_WRITTEN:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        save_atomic({**stock_entries(self), 'voxshield': self.voxshield_state(), 'rng_state': rng_state()}, filename)
