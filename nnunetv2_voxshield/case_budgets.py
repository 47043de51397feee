"""Per-case budgets for training: raw budget (from nnUNet_raw) translated into nnU-Net's normalised units."""
import os
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunetv2_voxshield.budget import (DEFAULT_BUDGET_MODE, DEFAULT_PERCENTILES, dataset_std, normalisation_scale,
                                       raw_budget)


def case_budget(data: np.ndarray, seg: np.ndarray, plans_manager, configuration_manager, eps: float,
                eps_abs: Optional[float] = None, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                mode: str = DEFAULT_BUDGET_MODE, std: Optional[Sequence[float]] = None) -> dict:
    """Budget of one raw case (data (c, *spatial), seg (1, *spatial)) in raw and in normalised units, per channel;
    ``mode`` and ``std`` (the dataset's std, for 'zscore-dataset') as in ``budget.raw_budget``."""
    budget = raw_budget(data, eps, eps_abs, percentiles, mode, std)
    cropped, cropped_seg, _ = crop_to_nonzero(data.astype(np.float32), seg.astype(np.int16))
    intensity_props = plans_manager.foreground_intensity_properties_per_channel
    scales = [normalisation_scale(cropped[c], cropped_seg[0], configuration_manager.normalization_schemes[c],
                                  configuration_manager.use_mask_for_norm[c], intensity_props.get(str(c)))
              for c in range(data.shape[0])]
    return {'raw_budget': [float(b) for b in budget], 'scale': [float(s) for s in scales],
            'eps_norm': [float(b * s) for b, s in zip(budget, scales)], 'empty_roi': bool(not np.any(seg > 0))}


def compute_case_budgets(raw_dataset_folder: str, dataset_json: dict, plans_manager, configuration_manager,
                         identifiers: Iterable[str], eps: float, eps_abs: Optional[float] = None,
                         percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                         mode: str = DEFAULT_BUDGET_MODE) -> Dict[str, dict]:
    """``case_budget`` for each identifier, reading the raw images with the plans' reader ('zscore-dataset': the
    std over every training case of the raw dataset)."""
    files = get_filenames_of_train_images_and_targets(raw_dataset_folder, dataset_json)
    reader = plans_manager.image_reader_writer_class()
    std = dataset_std(reader.read_images(f['images'])[0] for f in files.values()) \
        if mode == 'zscore-dataset' and eps_abs is None else None
    budgets = {}
    for identifier in identifiers:
        data, _ = reader.read_images(files[identifier]['images'])
        seg, _ = reader.read_seg(files[identifier]['label'])
        budgets[identifier] = case_budget(data, seg, plans_manager, configuration_manager, eps, eps_abs, percentiles,
                                          mode, std)
    return budgets


def budgets_from_preprocessed(dataset, identifiers: Iterable[str], eps: float,
                              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                              mode: str = DEFAULT_BUDGET_MODE) -> Dict[str, dict]:
    """Fallback without nnUNet_raw: ``raw_budget`` of the (already normalised) preprocessed case."""
    identifiers = list(identifiers)
    std = dataset_std(np.asarray(dataset.load_case(i)[0]) for i in identifiers) if mode == 'zscore-dataset' else None
    budgets = {}
    for identifier in identifiers:
        data, seg, _, _ = dataset.load_case(identifier)
        eps_norm = raw_budget(np.asarray(data), eps, None, percentiles, mode, std)
        budgets[identifier] = {'raw_budget': None, 'scale': None, 'eps_norm': [float(e) for e in eps_norm],
                               'empty_roi': bool(not np.any(np.asarray(seg) > 0))}
    return budgets


def raw_dataset_folder_or_none(dataset_name: str) -> Optional[str]:
    """$nnUNet_raw/<dataset_name> if it exists."""
    root = os.environ.get('nnUNet_raw')
    folder = os.path.join(root, dataset_name) if root else None
    return folder if folder and os.path.isdir(folder) else None
