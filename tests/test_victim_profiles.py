"""Victim profiles: each pipeline is stock minus (or plus) exactly what its name says, the label-aware transform,
Adam, every profile trains a step in-process on real data and one runs through stock nnUNetv2_train."""
from collections import Counter

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from conftest import requires_hippocampus, run_cli, validation_summary
from nnunetv2_voxshield.exploiter_transforms import LabelAwareIntensityTransform
from nnunetv2_voxshield.trainers import victim_profiles as vp

PATCH = (20, 24, 16)
DS_SCALES = [[1, 1, 1], [0.5, 0.5, 0.5]]
SCHEDULES = (1, 5, 10, 20)
FAMILY_PROFILES = {  # profile -> transform classes (by name) it must lack, from the issue
    vp.nnUNetTrainerDA_noSpatial: {'SpatialTransform'},
    vp.nnUNetTrainerDA_noNoiseBlur: {'GaussianNoiseTransform', 'GaussianBlurTransform'},
    vp.nnUNetTrainerDA_noIntensity: {'MultiplicativeBrightnessTransform', 'ContrastTransform', 'GammaTransform'},
    vp.nnUNetTrainerDA_noLowRes: {'SimulateLowResolutionTransform'},
    vp.nnUNetTrainerDA_noMirror: {'MirrorTransform'},
    vp.nnUNetTrainerDA_intensityMirrorOnly: {'SpatialTransform', 'GaussianNoiseTransform', 'GaussianBlurTransform',
                                             'SimulateLowResolutionTransform'},
    vp.nnUNetTrainerDA_onlySpatial: {'GaussianNoiseTransform', 'GaussianBlurTransform',
                                     'SimulateLowResolutionTransform'},
    vp.nnUNetTrainerDA_onlyNoiseBlur: {'SpatialTransform', 'SimulateLowResolutionTransform'},
    vp.nnUNetTrainerDA_onlyLowRes: {'SpatialTransform', 'GaussianNoiseTransform', 'GaussianBlurTransform'},
}
PSEUDO_2D = {'Convert3DTo2DTransform', 'Convert2DTo3DTransform'}


def training_pipeline(cls, dummy_2d=False):
    return cls.get_training_transforms(PATCH, (-0.5, 0.5), DS_SCALES, (0, 1, 2), dummy_2d, foreground_labels=[1, 2])


def leaves(t) -> list:
    """Class names of the transforms of a pipeline in order, through ComposeTransforms and RandomTransform."""
    if isinstance(t, ComposeTransforms):
        return [name for s in t.transforms for name in leaves(s)]
    if isinstance(t, RandomTransform):
        return leaves(t.transform)
    return [type(t).__name__]


def sample(channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((channels, *PATCH), generator=g)
    seg = torch.zeros((1, *PATCH), dtype=torch.int16)
    seg[0, 4:10, 4:12, 3:9] = 1
    seg[0, 12:18, 6:20, 5:13] = 2
    seg[0, :, :, :2] = -1  # padding of the loader
    return image, seg


def test_every_profile_and_schedule_is_found_by_nnunets_lookup_as_ours():
    """nnU-Net looks in nnunetv2 first: a name clash with a stock trainer would return stock's class here."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    import nnunetv2_voxshield.trainers as exported
    for base in vp.PROFILES:
        names = [f'{base.__name__}_{e}epochs' for e in SCHEDULES]
        if base.__module__ == vp.__name__:
            names.append(base.__name__)
        for name in names:
            ours = getattr(exported, name)
            assert recursive_find_trainer_class_by_name(name) is ours, name
        for e in SCHEDULES:
            cls = getattr(exported, f'{base.__name__}_{e}epochs')
            assert issubclass(cls, base) and cls.epochs == e and cls.__module__ == vp.__name__
    trainers = [v for n, v in vars(vp).items() if n.startswith('nnUNetTrainer') and n != 'nnUNetTrainer']
    assert all(cls.__module__ == vp.__name__ for cls in trainers)  # no stock class re-exported under its own name


@pytest.mark.parametrize('dummy_2d', [False, True], ids=['3d', 'dummy2d'])
@pytest.mark.parametrize('profile', FAMILY_PROFILES, ids=lambda c: c.__name__)
def test_family_profile_is_stock_minus_exactly_that_family(profile, dummy_2d):
    stock = leaves(nnUNetTrainer.get_training_transforms(PATCH, (-0.5, 0.5), DS_SCALES, (0, 1, 2), dummy_2d))
    ours = leaves(training_pipeline(profile, dummy_2d))
    family = FAMILY_PROFILES[profile] | (PSEUDO_2D if issubclass(profile, vp.nnUNetTrainerDA_noSpatial) else set())
    assert not family & set(ours)
    assert ours == [name for name in stock if name not in family]  # every other transform kept, in stock's order
    assert set(Counter(stock) - Counter(ours)) == family & set(stock) and FAMILY_PROFILES[profile] <= set(stock)
    if profile is vp.nnUNetTrainerDA_noIntensity:
        assert Counter(stock)['GammaTransform'] == 2  # the inverted gamma is removed too


@pytest.mark.parametrize('profile', FAMILY_PROFILES, ids=lambda c: c.__name__)
def test_family_profile_pipeline_runs_on_a_patch(profile):
    image, seg = sample()
    torch.manual_seed(0)
    out = training_pipeline(profile)(image=image.clone(), segmentation=seg.clone())
    assert out['image'].shape == (1, *PATCH) and [tuple(s.shape[1:]) for s in out['segmentation']] == \
        [PATCH, (10, 12, 8)]
    assert out['segmentation'][0].min() >= 0


def test_label_aware_profile_is_stock_plus_the_transform_before_intensity_and_downsampling():
    for dummy_2d in (False, True):
        stock = nnUNetTrainer.get_training_transforms(PATCH, (-0.5, 0.5), DS_SCALES, (0, 1, 2), dummy_2d)
        pipeline = training_pipeline(vp.nnUNetTrainerLabelAware, dummy_2d)
        ours, names = leaves(pipeline), leaves(stock)
        i = ours.index('LabelAwareIntensityTransform')
        assert ours[:i] + ours[i + 1:] == names
        assert ours[i - 1] == ('Convert2DTo3DTransform' if dummy_2d else 'SpatialTransform')
        assert ours[i + 1] == 'GaussianNoiseTransform' and i < ours.index('DownsampleSegForDSTransform')
        transform = next(t for t in pipeline.transforms if isinstance(t, LabelAwareIntensityTransform))
        assert transform.labels == [1, 2]


def label_offsets(diff, seg, label):
    values = diff[:, seg[0] == label]
    return values.min().item(), values.max().item()


def test_label_aware_offsets_are_constant_per_class_and_labels_unchanged():
    transform = LabelAwareIntensityTransform(p_offset=1, p_field=0)
    seen = []
    for seed in range(5):
        image, seg = sample(channels=2, seed=seed)
        np.random.seed(seed)
        out = transform(image=image.clone(), segmentation=seg.clone())
        assert torch.equal(out['segmentation'], seg)
        diff = out['image'] - image
        offsets = []
        for label in (1, 2):
            lo, hi = label_offsets(diff, seg, label)
            assert hi - lo < 1e-5 and abs(lo) <= 0.5 + 1e-6  # one offset per class, same in both channels
            offsets.append(lo)
        assert torch.all(diff[:, seg[0] <= 0] == 0)  # background and padding untouched
        assert abs(offsets[0] - offsets[1]) > 1e-4
        seen.append(offsets)
    assert np.std(np.array(seen)[:, 0]) > 0.05  # drawn per sample, not fixed


def test_label_aware_with_p_zero_changes_nothing():
    image, seg = sample(channels=2)
    np.random.seed(0)
    out = LabelAwareIntensityTransform(p_offset=0, p_field=0)(image=image.clone(), segmentation=seg.clone())
    assert torch.equal(out['image'], image) and torch.equal(out['segmentation'], seg)


def test_label_aware_only_offsets_the_given_labels():
    image, seg = sample()
    np.random.seed(0)
    out = LabelAwareIntensityTransform(p_offset=1, p_field=0, labels=[1])(image=image.clone(), segmentation=seg.clone())
    diff = out['image'] - image
    assert label_offsets(diff, seg, 2) == (0.0, 0.0) and label_offsets(diff, seg, 1)[0] != 0


def test_label_aware_field_is_smooth_everywhere_and_scaled():
    image, seg = sample(channels=2)
    np.random.seed(0)
    out = LabelAwareIntensityTransform(p_offset=0, p_field=1, field_amplitude=0.3)(image=image.clone(),
                                                                                   segmentation=seg.clone())
    assert torch.equal(out['segmentation'], seg)
    field = out['image'] - image
    assert torch.allclose(field[0], field[1], atol=1e-6)  # same field in every channel
    assert field.abs().max().item() == pytest.approx(0.3, abs=1e-5)
    assert field.std().item() > 0.03 and (field.abs() > 1e-6).float().mean() > 0.95  # background too
    white = torch.randn(PATCH, generator=torch.Generator().manual_seed(0))
    white = white / white.abs().max() * 0.3
    for axis in (1, 2, 3):  # neighbouring voxels differ far less than in white noise of the same peak
        smooth = field.diff(dim=axis).abs().mean().item()
        assert smooth < 0.2 * white.diff(dim=axis - 1).abs().mean().item()


def test_label_aware_defaults_apply_each_part_half_the_time():
    image, seg = sample()
    np.random.seed(0)
    offsets, fields = LabelAwareIntensityTransform(p_field=0), LabelAwareIntensityTransform(p_offset=0)
    n_offset = sum(bool((offsets(image=image.clone(), segmentation=seg)['image'] != image).any()) for _ in range(200))
    n_field = sum(bool((fields(image=image.clone(), segmentation=seg)['image'] != image).any()) for _ in range(200))
    assert 70 < n_offset < 130 and 70 < n_field < 130


def make_trainer(name, initialize=False):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args('4', '3d_fullres', 0, name, 'nnUNetPlans', device=torch.device('cpu'))
    if initialize:
        trainer.initialize()
    return trainer


def crop_vs_batch(trainer):
    """The same draw (keys, crops) from the training loader with and without the trainer's transforms."""
    loader = trainer.get_dataloaders()[0].data_loader
    np.random.seed(1)
    torch.manual_seed(1)
    augmented = loader.generate_train_batch()
    loader.transforms = None
    np.random.seed(1)
    torch.manual_seed(1)
    return augmented, loader.generate_train_batch()


@requires_hippocampus
def test_noda_batch_is_the_plain_crop(hippocampus_env):
    trainer = make_trainer('nnUNetTrainerNoDA_1epochs', initialize=True)
    batch, crop = crop_vs_batch(trainer)
    assert list(batch['keys']) == list(crop['keys'])
    assert tuple(batch['data'].shape[2:]) == tuple(trainer.configuration_manager.patch_size)
    assert torch.equal(batch['data'], crop['data'])
    assert torch.equal(batch['target'][0].long(), crop['target'].clamp_min(0).long())
    # control: same crop, but stock augmentation without its spatial part changes the intensities
    trainer = make_trainer('nnUNetTrainerDA_noSpatial_1epochs', initialize=True)
    batch, crop = crop_vs_batch(trainer)
    assert batch['data'].shape == crop['data'].shape and not torch.equal(batch['data'], crop['data'])


@requires_hippocampus
def test_adam_profile_optimiser(hippocampus_env):
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    trainer = make_trainer('nnUNetTrainerVanillaAdam5en4_20epochs', initialize=True)
    assert type(trainer.optimizer) is torch.optim.Adam
    assert [g['lr'] for g in trainer.optimizer.param_groups] == [5e-4] * len(trainer.optimizer.param_groups)
    assert isinstance(trainer.lr_scheduler, PolyLRScheduler) and trainer.lr_scheduler.max_steps == 20
    assert type(make_trainer('nnUNetTrainer', initialize=True).optimizer) is torch.optim.SGD  # control


@requires_hippocampus
@pytest.mark.parametrize('profile', vp.PROFILES, ids=lambda c: c.__name__)
def test_every_profile_trains_a_step_on_real_data(profile, hippocampus_env):
    trainer = make_trainer(f'{profile.__name__}_1epochs')
    trainer.on_train_start()
    patch = tuple(trainer.configuration_manager.patch_size)
    assert trainer.num_epochs == 1
    if issubclass(profile, vp.nnUNetTrainerDA_noSpatial):
        assert tuple(trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[2]) == patch
    if profile is vp.nnUNetTrainerDA_noMirror:  # training mirroring only: test-time mirroring stays stock
        assert tuple(trainer.inference_allowed_mirroring_axes) == (0, 1, 2)
    batch = next(trainer.dataloader_train)
    assert tuple(batch['data'].shape[2:]) == patch
    before = [p.detach().clone() for p in trainer.network.parameters()]
    out = trainer.train_step(batch)
    assert np.isfinite(out['loss'])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.network.parameters()))


@pytest.mark.slow
@requires_hippocampus
def test_label_aware_profile_through_stock_nnunetv2_train(hippocampus_env, test_trainers_env):
    run_cli(['nnUNetv2_train', '4', '3d_fullres', '0', '-tr', 'nnUNetTrainerLabelAware_tiny', '-device', 'cpu'])
    fold = (hippocampus_env['nnUNet_results'] / 'Dataset004_Hippocampus' /
            'nnUNetTrainerLabelAware_tiny__nnUNetPlans__3d_fullres' / 'fold_0')
    ckpt = torch.load(fold / 'checkpoint_final.pth', weights_only=False)
    assert ckpt['trainer_name'] == 'nnUNetTrainerLabelAware_tiny' and ckpt['current_epoch'] == 1
    validation_summary(fold, {'1', '2'})
    assert (fold / 'checkpoint_best.pth').is_file()  # a victim is stock nnU-Net: its best checkpoint stays
