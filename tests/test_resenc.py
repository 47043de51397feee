"""Residual-encoder victims: nnU-Net's ResEncM plans on the phantom, shrunk by the CPU preset, built and run."""
import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from nnunetv2_voxshield.evaluate import parse_plans
from nnunetv2_voxshield.phantom import write_phantom_dataset
from nnunetv2_voxshield.plans import load_preset, split_plans_name

DATASET = 'Dataset860_ResEncPhantom'


def test_plans_names():
    assert split_plans_name('nnUNetResEncUNetMPlans_cpu') == ('nnUNetResEncUNetMPlans', 'nnUNetPlannerResEncM', 'cpu')
    assert split_plans_name('nnUNetResEncUNetXLPlans') == ('nnUNetResEncUNetXLPlans', 'nnUNetPlannerResEncXL', None)
    assert split_plans_name('nnUNetPlans_cpu') == ('nnUNetPlans', 'ExperimentPlanner', 'cpu')
    assert parse_plans('nnUNetResEncUNetMPlans_cpu') == 'cpu'


@pytest.fixture(scope='module')
def resenc(tmp_path_factory):
    """The phantom planned by nnUNetPlannerResEncM (no preprocessing), then voxshield_plans --preset cpu."""
    root = tmp_path_factory.mktemp('resenc')
    env = {}
    for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (root / name).mkdir()
        env[name] = str(root / name)
    write_phantom_dataset(860, 'ResEncPhantom', n_cases=3, raw_root=env['nnUNet_raw'])
    run_cli(['nnUNetv2_plan_and_preprocess', '-d', '860', '-pl', 'nnUNetPlannerResEncM', '--no_pp', '-npfp', '1'],
            {**env, 'nnUNet_n_proc_DA': None})
    run_cli(['voxshield_plans', '-d', '860', '-p', 'nnUNetResEncUNetMPlans', '--preset', 'cpu'], env)
    folder = Path(env['nnUNet_preprocessed']) / DATASET
    return (json.loads((folder / 'nnUNetResEncUNetMPlans.json').read_text()),
            json.loads((folder / 'nnUNetResEncUNetMPlans_cpu.json').read_text()))


@pytest.mark.parametrize('configuration', ['3d_fullres', '2d'])
def test_preset_shrinks_resenc_and_network_runs(resenc, configuration):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    source, shrunk = resenc
    assert shrunk['plans_name'] == 'nnUNetResEncUNetMPlans_cpu'
    src, out = source['configurations'][configuration], shrunk['configurations'][configuration]
    dims = '3d' if configuration == '3d_fullres' else '2d'
    preset = load_preset('cpu')[dims]
    arch = out['architecture']
    assert arch['network_class_name'] == src['architecture']['network_class_name'] == \
        'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
    kw, src_kw = arch['arch_kwargs'], src['architecture']['arch_kwargs']
    n = kw['n_stages']
    assert 2 <= n <= min(preset['max_stages'], src_kw['n_stages'])
    assert max(src_kw['features_per_stage']) > preset['max_features']  # there was something to shrink
    assert kw['features_per_stage'] == [min(preset['max_features'], preset['base_features'] * 2 ** i)
                                        for i in range(n)]
    assert kw['n_blocks_per_stage'] == src_kw['n_blocks_per_stage'][:n] and 'n_conv_per_stage' not in kw
    assert kw['n_conv_per_stage_decoder'] == src_kw['n_conv_per_stage_decoder'][:n - 1]
    assert len(kw['kernel_sizes']) == len(kw['strides']) == n
    assert all(p <= q for p, q in zip(out['patch_size'], preset['patch_size']))
    assert out['batch_size'] == preset['batch_size'] and out['data_identifier'] == src['data_identifier']
    assert {k: v for k, v in kw.items() if k not in ('n_stages', 'features_per_stage', 'kernel_sizes', 'strides',
                                                    'n_blocks_per_stage', 'n_conv_per_stage_decoder')} == \
        {k: v for k, v in src_kw.items() if k not in ('n_stages', 'features_per_stage', 'kernel_sizes', 'strides',
                                                      'n_blocks_per_stage', 'n_conv_per_stage_decoder')}
    torch.manual_seed(0)
    network = get_network_from_plans(arch['network_class_name'], kw, arch['_kw_requires_import'], 1, 3,
                                     allow_init=True, deep_supervision=True)
    with torch.no_grad():
        outputs = network(torch.randn(1, 1, *out['patch_size']))
    assert outputs[0].shape == (1, 3, *out['patch_size']) and len(outputs) == n - 1
    assert sum(p.numel() for p in network.parameters()) < 2e6  # CPU-sized
