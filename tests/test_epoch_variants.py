"""<Trainer>_<N>epochs variants: every trainer family has them, nnU-Net's lookup finds them, num_epochs is N."""
import pytest
import torch

from nnunetv2_voxshield.trainers.epochs import BASES, EPOCHS, epoch_variant


@pytest.mark.parametrize('base', BASES, ids=lambda b: b.__name__)
def test_every_family_has_each_schedule_found_by_nnunets_lookup(base):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    import nnunetv2_voxshield.trainers as exported
    for epochs in EPOCHS:
        cls = getattr(exported, f'{base.__name__}_{epochs}epochs')
        assert cls.__name__ == f'{base.__name__}_{epochs}epochs' and issubclass(cls, base) and cls.epochs == epochs
    assert recursive_find_trainer_class_by_name(f'{base.__name__}_5epochs') is exported.__dict__[
        f'{base.__name__}_5epochs']


def test_epoch_variant_sets_num_epochs_after_the_base_init():
    class Base:
        def __init__(self, plans, configuration, fold, dataset_json, device):
            self.num_epochs, self.args = 1000, (plans, configuration, fold, dataset_json, device)

    trainer = epoch_variant(Base, 20)({'p': 1}, '3d_fullres', 0, {}, torch.device('cpu'))
    assert trainer.num_epochs == 20 and trainer.args[1] == '3d_fullres'
    assert type(trainer).__name__ == 'Base_20epochs'
