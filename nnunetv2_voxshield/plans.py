"""Plans presets: derive small (e.g. CPU-friendly) nnU-Net plans from the stock ``nnUNetPlans.json``.

A preset (``plans/<name>.json``, installed as ``nnunetv2_voxshield.presets``) caps the patch size, the number of
stages, the features and the batch size of every 2d/3d configuration. Each configuration keeps its
``data_identifier``, so the new plans reuse the preprocessed data of the source plans (no re-preprocessing).
Topology (kernel sizes, strides) is recomputed with nnU-Net's own ``get_pool_and_conv_props`` for the new patch.
"""
import argparse
import json
import os
import sys
from copy import deepcopy
from importlib import resources
from typing import List, Optional, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnunetv2_voxshield.dataset_io import write_json_atomic

PRESET_KEYS = ('patch_size', 'max_stages', 'base_features', 'max_features', 'batch_size', 'min_feature_map_size',
               'n_conv_per_stage', 'n_conv_per_stage_decoder', 'n_blocks_per_stage')
# stock plans names -> the nnU-Net planner that writes them (nnUNetv2_plan_and_preprocess -pl)
STOCK_PLANNERS = {'nnUNetPlans': 'ExperimentPlanner', 'nnUNetResEncUNetMPlans': 'nnUNetPlannerResEncM',
                  'nnUNetResEncUNetLPlans': 'nnUNetPlannerResEncL', 'nnUNetResEncUNetXLPlans': 'nnUNetPlannerResEncXL'}


def split_plans_name(plans: str) -> tuple:
    """'nnUNetResEncUNetMPlans_cpu' -> ('nnUNetResEncUNetMPlans', 'nnUNetPlannerResEncM', 'cpu'); the preset is None
    for stock plans. ValueError for a name that is neither stock plans nor stock plans + '_' + a shipped preset."""
    for source in sorted(STOCK_PLANNERS, key=len, reverse=True):
        preset = plans[len(source) + 1:] if plans.startswith(source + '_') else None
        if plans == source or preset in available_presets():
            return source, STOCK_PLANNERS[source], preset
    raise ValueError(f"-p {plans}: use stock plans ({', '.join(STOCK_PLANNERS)}) or stock plans with a preset, e.g. "
                     f"{', '.join(f'nnUNetPlans_{p}' for p in available_presets())} or nnUNetResEncUNetMPlans_cpu")


def available_presets() -> List[str]:
    """Names of the presets shipped with the package (``plans/*.json``)."""
    return sorted(p.name[:-len('.json')] for p in resources.files('nnunetv2_voxshield.presets').iterdir()
                  if p.name.endswith('.json'))


def load_preset(preset: str) -> dict:
    """A shipped preset by name (e.g. 'cpu') or a path to a preset JSON file."""
    if preset.endswith('.json') and os.path.isfile(preset):
        text, where = open(preset).read(), preset
    else:
        resource = resources.files('nnunetv2_voxshield.presets') / f'{preset}.json'
        if not resource.is_file():
            raise ValueError(f"unknown plans preset {preset!r}; available: {', '.join(available_presets())} "
                             f"(or a path to a preset .json file)")
        text, where = resource.read_text(), str(resource)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    for dims in ('2d', '3d'):
        unknown = set(values.get(dims, {})) - set(PRESET_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys in {dims!r}: {sorted(unknown)}; allowed: {list(PRESET_KEYS)}")
    return values


def small_topology(spacing: Sequence[float], source_patch: Sequence[int], preset_dims: dict) -> dict:
    """Patch size, kernel sizes and strides for the preset's patch (capped at ``source_patch``) and stage count."""
    patch = [int(min(p, s)) for p, s in zip(preset_dims['patch_size'], source_patch)]
    _, strides, kernels, _, _ = get_pool_and_conv_props(list(spacing), patch,
                                                        preset_dims.get('min_feature_map_size', 4), 999999)
    n_stages = min(len(strides), int(preset_dims['max_stages']))
    if n_stages < 2:
        raise ValueError(f"patch {patch} is too small for a U-Net with min_feature_map_size "
                         f"{preset_dims.get('min_feature_map_size', 4)}")
    strides = [list(map(int, s)) for s in strides[:n_stages]]
    kernels = [list(map(int, k)) for k in kernels[:n_stages]]
    divisor = np.prod(np.array(strides), axis=0)
    patch = [int(np.ceil(p / d) * d) for p, d in zip(patch, divisor)]
    return {'patch_size': patch, 'strides': strides, 'kernel_sizes': kernels, 'n_stages': n_stages}


def _per_stage(value, n: int) -> List[int]:
    """An int -> repeated n times; a list -> its first n entries (last one repeated if too short)."""
    values = [int(value)] * n if np.isscalar(value) else [int(v) for v in value]
    return (values + [values[-1]] * n)[:n]


def shrink_configuration(config: dict, resolved: dict, preset_dims: dict) -> dict:
    """A copy of ``config`` with the preset applied. ``resolved`` is the config with inherited keys filled in."""
    arch = resolved['architecture']['arch_kwargs']
    topo = small_topology(resolved['spacing'], resolved['patch_size'], preset_dims)
    n = topo['n_stages']
    base, top = int(preset_dims['base_features']), int(preset_dims['max_features'])
    new_arch = deepcopy(resolved['architecture'])
    new_arch['arch_kwargs'].update({
        'n_stages': n,
        'features_per_stage': [min(top, base * 2 ** i) for i in range(n)],
        'kernel_sizes': topo['kernel_sizes'],
        'strides': topo['strides'],
        'n_conv_per_stage_decoder': _per_stage(preset_dims.get('n_conv_per_stage_decoder',
                                                               arch['n_conv_per_stage_decoder']), n - 1),
    })
    # encoder depth per stage: convolutions (PlainConvUNet) or residual blocks (ResidualEncoderUNet, the ResEnc presets)
    encoder_key = 'n_blocks_per_stage' if 'n_blocks_per_stage' in arch else 'n_conv_per_stage'
    new_arch['arch_kwargs'][encoder_key] = _per_stage(preset_dims.get(encoder_key, arch[encoder_key]), n)
    out = deepcopy(config)
    out.update({'patch_size': topo['patch_size'], 'batch_size': int(preset_dims['batch_size']),
                'architecture': new_arch})
    return out


def _resolve(configurations: dict, name: str) -> dict:
    config = configurations[name]
    if 'inherits_from' in config:
        resolved = deepcopy(_resolve(configurations, config['inherits_from']))
        resolved.update({k: v for k, v in config.items() if k != 'inherits_from'})
        return resolved
    return config


def _depends_on(configurations: dict, name: str, dropped: set) -> bool:
    config = configurations[name]
    parents = [config.get('inherits_from'), config.get('previous_stage')]
    return any(p is not None and (p in dropped or _depends_on(configurations, p, dropped))
               for p in parents if p in configurations or p in dropped)


def preset_plans(plans: dict, preset: dict, plans_name: str) -> dict:
    """New plans dict: ``plans`` with the preset applied to every configuration (pure function)."""
    configurations = plans['configurations']
    dropped = {c for c in preset.get('drop_configurations', []) if c in configurations}
    dropped |= {c for c in configurations if _depends_on(configurations, c, dropped)}
    new_configs = {}
    for name, config in configurations.items():
        if name in dropped:
            continue
        resolved = _resolve(configurations, name)
        dims = f"{len(resolved['patch_size'])}d"
        own = 'inherits_from' not in config or any(k in config for k in ('patch_size', 'architecture',
                                                                           'batch_size', 'spacing'))
        if own and dims in preset:
            try:
                new_configs[name] = shrink_configuration(config, resolved, preset[dims])
            except ValueError as e:
                raise ValueError(f"configuration {name!r}: {e}") from None
        else:
            new_configs[name] = deepcopy(config)
    out = deepcopy(plans)
    out['plans_name'] = plans_name
    out['configurations'] = new_configs
    return out


def apply_plans_preset(dataset_name_or_id, preset: str = 'cpu', source_plans: str = 'nnUNetPlans',
                       output_plans: Optional[str] = None) -> str:
    """Write ``<output_plans>.json`` (default ``<source_plans>_<preset>``) next to the source plans; return its path."""
    values = load_preset(preset)
    preprocessed = os.environ.get('nnUNet_preprocessed')
    if not preprocessed:
        raise ValueError("nnUNet_preprocessed is not set; run nnUNetv2_plan_and_preprocess first")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except ValueError:
        raise ValueError(f"dataset {dataset_name_or_id!r} is neither an id nor a name like Dataset004_Name") from None
    except RuntimeError as e:
        if 'More than one' in str(e):
            raise ValueError(f"several dataset folders use id {dataset_name_or_id}; pass the full dataset name") from None
        raise ValueError(f"dataset {dataset_name_or_id!r} not found in nnUNet_raw or nnUNet_preprocessed "
                         f"({preprocessed}); run nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} first") from None
    source_file = join(preprocessed, dataset_name, f'{source_plans}.json')
    if not os.path.isfile(source_file):
        raise ValueError(f"{source_file}: source plans not found; run nnUNetv2_plan_and_preprocess "
                         f"-d {dataset_name_or_id} first (or pass the plans name with -p)")
    output_plans = output_plans or f'{source_plans}_{os.path.basename(preset).removesuffix(".json")}'
    if output_plans == source_plans:
        raise ValueError(f"output plans name {output_plans!r} equals the source plans; choose another with -o")
    try:
        with open(source_file) as f:
            plans = json.load(f)
        if not isinstance(plans, dict) or not isinstance(plans.get('configurations'), dict):
            raise KeyError('configurations')
        new_plans = preset_plans(plans, values, output_plans)
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{source_file}: not a valid nnU-Net plans file ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{source_file}: {e}") from None
    out_file = join(preprocessed, dataset_name, f'{output_plans}.json')
    write_json_atomic(new_plans, out_file, indent=4)
    return out_file


def plans_entry():
    """``voxshield_plans``: parse the arguments and write the preset plans next to the source plans."""
    parser = argparse.ArgumentParser(description='Write small nnU-Net plans (e.g. for CPU training) derived from '
                                                 'the stock plans; no re-preprocessing needed. Reads '
                                                 '$nnUNet_preprocessed/DatasetXXX_Name/<-p>.json (written by '
                                                 'nnUNetv2_plan_and_preprocess) and the preset (plans/<preset>.json '
                                                 'in this package, or a .json path); writes <-o>.json next to it '
                                                 '(the source plans are never modified).')
    parser.add_argument('-d', type=str, required=True, help='dataset name or id')
    parser.add_argument('--preset', type=str, default='cpu',
                        help=f"preset name ({', '.join(available_presets())}) or a preset .json path. Default: cpu")
    parser.add_argument('-p', type=str, default='nnUNetPlans', help='source plans name. Default: nnUNetPlans')
    parser.add_argument('-o', type=str, default=None,
                        help='output plans name. Default: <source plans>_<preset>, e.g. nnUNetPlans_cpu')
    args = parser.parse_args()
    try:
        path = apply_plans_preset(args.d, args.preset, args.p, args.o)
    except (ValueError, OSError) as e:
        sys.exit(f'voxshield_plans: error: {e}')
    name = os.path.basename(path)[:-len('.json')]
    print(f'wrote {path}\ntrain with: nnUNet_n_proc_DA=0 nnUNetv2_train {args.d} 3d_fullres all '
          f'-tr nnUNetTrainerVoxShield -p {name} -device cpu')


if __name__ == '__main__':
    plans_entry()
