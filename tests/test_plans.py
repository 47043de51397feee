"""Plans presets: values applied to plans dicts, errors, and stock nnU-Net training on the phantom with them."""
import json
import os
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest

from conftest import validation_summary
from nnunetv2_voxshield.phantom import write_phantom_dataset
from nnunetv2_voxshield.plans import apply_plans_preset, available_presets, load_preset, preset_plans

TEST_TRAINERS = Path(__file__).resolve().parent / 'nnunet_test_trainers'
DATASET = 'Dataset993_PlansPhantom'


def _arch(kernels, strides, features, conv='torch.nn.modules.conv.Conv3d'):
    n = len(strides)
    return {'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
            'arch_kwargs': {'n_stages': n, 'features_per_stage': features, 'conv_op': conv,
                            'kernel_sizes': kernels, 'strides': strides, 'n_conv_per_stage': [2] * n,
                            'n_conv_per_stage_decoder': [2] * (n - 1), 'conv_bias': True},
            '_kw_requires_import': ['conv_op']}


def _stock_like_plans() -> dict:
    """Stock-shaped plans with 2d, 3d_fullres (anisotropic), 3d_lowres and the cascade."""
    k3, s3 = [[1, 3, 3]] + [[3, 3, 3]] * 5, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    return {'dataset_name': 'Dataset001_X', 'plans_name': 'nnUNetPlans', 'configurations': {
        '2d': {'data_identifier': 'nnUNetPlans_2d', 'batch_size': 12, 'patch_size': [320, 256], 'spacing': [0.8, 0.8],
               'architecture': _arch([[3, 3]] * 7, [[1, 1]] + [[2, 2]] * 6, [32, 64, 128, 256, 512, 512, 512],
                                     'torch.nn.modules.conv.Conv2d')},
        '3d_fullres': {'data_identifier': 'nnUNetPlans_3d_fullres', 'batch_size': 2, 'patch_size': [20, 192, 160],
                       'spacing': [3.0, 0.8, 0.8], 'architecture': _arch(k3, s3, [32, 64, 128, 256, 320, 320])},
        '3d_lowres': {'data_identifier': 'nnUNetPlans_3d_lowres', 'batch_size': 2, 'patch_size': [24, 160, 128],
                      'spacing': [3.0, 1.6, 1.6], 'architecture': _arch(k3, s3, [32, 64, 128, 256, 320, 320]),
                      'next_stage': '3d_cascade_fullres'},
        '3d_cascade_fullres': {'inherits_from': '3d_fullres', 'previous_stage': '3d_lowres'},
        '3d_fullres_bs4': {'inherits_from': '3d_fullres', 'batch_size': 4},
        '3d_fullres_alias': {'inherits_from': '3d_fullres'},
    }}


def _check_config(config: dict, preset_dims: dict):
    arch = config['architecture']['arch_kwargs']
    n = arch['n_stages']
    assert 2 <= n <= preset_dims['max_stages']
    assert len(arch['features_per_stage']) == len(arch['kernel_sizes']) == len(arch['strides']) == n
    assert len(arch['n_conv_per_stage']) == n and len(arch['n_conv_per_stage_decoder']) == n - 1
    assert arch['features_per_stage'][0] == preset_dims['base_features']
    assert max(arch['features_per_stage']) <= preset_dims['max_features']
    assert config['batch_size'] == preset_dims['batch_size']
    assert all(p <= q for p, q in zip(config['patch_size'], preset_dims['patch_size']))
    divisor = np.prod(np.array(arch['strides']), axis=0)
    assert all(p % d == 0 for p, d in zip(config['patch_size'], divisor)), (config['patch_size'], divisor)


def test_cpu_preset_is_shipped_and_documented():
    assert 'cpu' in available_presets()
    preset = load_preset('cpu')
    assert preset['3d']['patch_size'] == [32, 32, 32] and preset['3d']['batch_size'] == 2
    assert max(preset['2d']['patch_size']) <= 64
    for dims in ('2d', '3d'):
        assert 8 <= preset[dims]['base_features'] <= preset[dims]['max_features'] <= 32
        assert 3 <= preset[dims]['max_stages'] <= 4
        assert all(k in preset['keys'] for k in preset[dims])  # every key is documented


def test_preset_applied_to_stock_like_plans():
    preset = load_preset('cpu')
    source = _stock_like_plans()
    original = deepcopy(source)
    out = preset_plans(source, preset, 'nnUNetPlans_cpu')
    assert source == original  # pure function
    assert out['plans_name'] == 'nnUNetPlans_cpu' and out['dataset_name'] == 'Dataset001_X'
    configs = out['configurations']
    # lowres dropped, and with it the cascade that needs it; everything else kept
    assert set(configs) == {'2d', '3d_fullres', '3d_fullres_bs4', '3d_fullres_alias'}
    for name in ('2d', '3d_fullres'):
        assert configs[name]['data_identifier'] == original['configurations'][name]['data_identifier']
        assert configs[name]['spacing'] == original['configurations'][name]['spacing']
    _check_config(configs['2d'], preset['2d'])
    _check_config(configs['3d_fullres'], preset['3d'])
    # anisotropic source: the patch stays capped at the source's 20 slices, z is pooled less and convolved in-plane first
    assert configs['3d_fullres']['patch_size'] == [20, 32, 32]
    arch3 = configs['3d_fullres']['architecture']['arch_kwargs']
    assert arch3['kernel_sizes'][0] == [1, 3, 3]
    assert np.prod([s[0] for s in arch3['strides']]) < np.prod([s[1] for s in arch3['strides']])
    assert configs['2d']['patch_size'] == [64, 64]
    # a variant overriding batch_size is shrunk too; a plain alias just inherits the shrunk parent
    _check_config({**configs['3d_fullres'], **configs['3d_fullres_bs4']}, preset['3d'])
    assert configs['3d_fullres_alias'] == {'inherits_from': '3d_fullres'}


def test_cascade_kept_when_not_dropped(tmp_path):
    preset = load_preset('cpu')
    preset['drop_configurations'] = []
    configs = preset_plans(_stock_like_plans(), preset, 'x')['configurations']
    assert configs['3d_cascade_fullres'] == {'inherits_from': '3d_fullres', 'previous_stage': '3d_lowres'}
    _check_config(configs['3d_lowres'], preset['3d'])
    assert configs['3d_lowres']['data_identifier'] == 'nnUNetPlans_3d_lowres'
    assert configs['3d_lowres']['next_stage'] == '3d_cascade_fullres'


def test_preset_from_json_path_and_unknown_keys(tmp_path):
    custom = load_preset('cpu')
    custom['3d'].update(patch_size=[16, 16, 16], max_stages=3, base_features=4, max_features=8, n_conv_per_stage=1)
    path = tmp_path / 'tiny.json'
    path.write_text(json.dumps(custom))
    out = preset_plans(_stock_like_plans(), load_preset(str(path)), 'nnUNetPlans_tiny')['configurations']
    arch = out['3d_fullres']['architecture']['arch_kwargs']
    assert arch['features_per_stage'] == [4, 8, 8] and arch['n_conv_per_stage'] == [1, 1, 1]
    assert arch['n_conv_per_stage_decoder'] == [2, 2]
    custom['3d']['patchsize'] = [8, 8, 8]
    path.write_text(json.dumps(custom))
    with pytest.raises(ValueError, match='unknown keys'):
        load_preset(str(path))
    path.write_text('{not json')
    with pytest.raises(ValueError, match='not valid JSON'):
        load_preset(str(path))


def test_too_small_patch_is_an_error(nnunet_dirs):
    plans = _stock_like_plans()
    plans['configurations']['3d_fullres']['patch_size'] = [6, 6, 6]
    with pytest.raises(ValueError, match="configuration '3d_fullres': patch .* too small"):
        preset_plans(plans, load_preset('cpu'), 'x')
    folder = nnunet_dirs['nnUNet_preprocessed'] / 'Dataset997_X'
    folder.mkdir()
    (folder / 'nnUNetPlans.json').write_text(json.dumps(plans))
    with pytest.raises(ValueError, match=r"nnUNetPlans\.json: configuration '3d_fullres'"):
        apply_plans_preset(997)
    assert os.listdir(folder) == ['nnUNetPlans.json']


def test_unknown_preset_and_missing_plans(nnunet_dirs):
    with pytest.raises(ValueError, match="unknown plans preset 'gpu'.*cpu"):
        apply_plans_preset(4, preset='gpu')
    with pytest.raises(ValueError, match='nnUNetv2_plan_and_preprocess'):
        apply_plans_preset(998)
    (nnunet_dirs['nnUNet_preprocessed'] / 'Dataset998_X').mkdir()
    with pytest.raises(ValueError, match=r'nnUNetPlans\.json: source plans not found.*nnUNetv2_plan_and_preprocess'):
        apply_plans_preset(998)
    (nnunet_dirs['nnUNet_preprocessed'] / 'Dataset998_X' / 'nnUNetPlans.json').write_text('[]')
    with pytest.raises(ValueError, match='not a valid nnU-Net plans file'):
        apply_plans_preset('Dataset998_X')
    with pytest.raises(ValueError, match='neither an id nor a name'):
        apply_plans_preset('hippo')
    assert os.listdir(nnunet_dirs['nnUNet_preprocessed'] / 'Dataset998_X') == ['nnUNetPlans.json']


def test_cli_errors_are_one_line(nnunet_dirs):
    for args, message in ((['-d', '4', '--preset', 'gpu'], 'unknown plans preset'),
                          (['-d', '998'], 'nnUNetv2_plan_and_preprocess')):
        r = subprocess.run([sys.executable, '-c', 'from nnunetv2_voxshield.plans import plans_entry; plans_entry()']
                           + args, capture_output=True, text=True)
        assert r.returncode == 1
        assert r.stderr.strip().count('\n') == 0 and message in r.stderr, r.stderr


# ---- stock nnU-Net on the phantom (one planning for the module) ----

@pytest.fixture(scope='module')
def planned_phantom(tmp_path_factory):
    """5-case phantom planned and preprocessed by stock nnU-Net (3d_fullres and 2d), plus nnUNetPlans_cpu."""
    root = tmp_path_factory.mktemp('plans_phantom')
    env = dict(os.environ)
    for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (root / name).mkdir()
        env[name] = str(root / name)
    env.pop('nnUNet_n_proc_DA', None)  # the planner fails with it
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # busy-waiting OpenMP threads crawl on a shared, loaded CPU
    write_phantom_dataset(993, name='PlansPhantom', n_cases=5, raw_root=env['nnUNet_raw'])
    r = subprocess.run(['nnUNetv2_plan_and_preprocess', '-d', '993', '-c', '3d_fullres', '2d', '-np', '1',
                        '-npfp', '1', '--verify_dataset_integrity'], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env['nnUNet_n_proc_DA'] = '0'
    env['nnUNet_extTrainer'] = os.pathsep.join([str(TEST_TRAINERS)] + [p for p in os.environ.get(
        'nnUNet_extTrainer', '').split(os.pathsep) if p])
    r = subprocess.run(['voxshield_plans', '-d', '993', '--preset', 'cpu'], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return env, Path(env['nnUNet_preprocessed']) / DATASET


def test_preset_on_planned_phantom(planned_phantom):
    _, folder = planned_phantom
    source = json.loads((folder / 'nnUNetPlans.json').read_text())
    out = json.loads((folder / 'nnUNetPlans_cpu.json').read_text())
    preset = load_preset('cpu')
    assert out['plans_name'] == 'nnUNetPlans_cpu'
    assert set(out['configurations']) == set(source['configurations'])
    for name, config in out['configurations'].items():
        assert config['data_identifier'] == source['configurations'][name]['data_identifier']
        assert (folder / config['data_identifier']).is_dir()  # reuses the stock preprocessed data
        _check_config(config, preset['3d' if len(config['patch_size']) == 3 else '2d'])
    assert out['configurations']['3d_fullres']['patch_size'] == [32, 32, 32]
    assert not [p for p in os.listdir(folder) if p.startswith('.tmp_')]


@pytest.mark.slow
@pytest.mark.parametrize('trainer', ['nnUNetTrainer_tiny', 'nnUNetTrainerVoxShield_tiny'])
@pytest.mark.parametrize('configuration', ['3d_fullres', '2d'])
def test_stock_training_with_cpu_plans(planned_phantom, configuration, trainer):
    env, _ = planned_phantom
    r = subprocess.run(['nnUNetv2_train', '993', configuration, '0', '-p', 'nnUNetPlans_cpu', '-tr', trainer,
                        '-device', 'cpu'], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = Path(env['nnUNet_results']) / DATASET / f'{trainer}__nnUNetPlans_cpu__{configuration}' / 'fold_0'
    import torch
    checkpoint = torch.load(out / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert checkpoint['trainer_name'] == trainer and checkpoint['current_epoch'] == 1
    plans = json.loads((Path(env['nnUNet_preprocessed']) / DATASET / 'nnUNetPlans_cpu.json').read_text())
    arch = plans['configurations'][configuration]['architecture']['arch_kwargs']
    first_conv = checkpoint['network_weights']['encoder.stages.0.0.convs.0.conv.weight']
    assert first_conv.shape[0] == arch['features_per_stage'][0] == load_preset('cpu')[
        '3d' if configuration == '3d_fullres' else '2d']['base_features']  # the preset's network was trained
    assert first_conv.ndim == (5 if configuration == '3d_fullres' else 4)
    if trainer == 'nnUNetTrainerVoxShield_tiny':
        assert checkpoint['voxshield']['iteration'] == 4 and not (out / 'checkpoint_best.pth').exists()
    validation_summary(out, {'1', '2'})
