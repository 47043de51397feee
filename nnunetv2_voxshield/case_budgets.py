"""Per-case budgets for training: raw budget (from nnUNet_raw) translated into nnU-Net's normalised units."""
import os
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunetv2_voxshield.budget import DEFAULT_PERCENTILES, normalisation_scale, percentile_range, raw_budget


def case_budget(data: np.ndarray, seg: np.ndarray, plans_manager, configuration_manager, eps: float,
                eps_abs: Optional[float] = None, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict:
    """Budget of one raw case (data (c, *spatial), seg (1, *spatial)) in raw and in normalised units, per channel."""
    budget = raw_budget(data, eps, eps_abs, percentiles)
    cropped, cropped_seg, _ = crop_to_nonzero(data.astype(np.float32), seg.astype(np.int16))
    intensity_props = plans_manager.foreground_intensity_properties_per_channel
    scales = [normalisation_scale(cropped[c], cropped_seg[0], configuration_manager.normalization_schemes[c],
                                  configuration_manager.use_mask_for_norm[c], intensity_props.get(str(c)))
              for c in range(data.shape[0])]
    return {'raw_budget': [float(b) for b in budget], 'scale': [float(s) for s in scales],
            'eps_norm': [float(b * s) for b, s in zip(budget, scales)], 'empty_roi': bool(not np.any(seg > 0))}


def compute_case_budgets(raw_dataset_folder: str, dataset_json: dict, plans_manager, configuration_manager,
                         identifiers: Iterable[str], eps: float, eps_abs: Optional[float] = None,
                         percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Dict[str, dict]:
    """``case_budget`` for each identifier, reading the raw images with the plans' reader."""
    files = get_filenames_of_train_images_and_targets(raw_dataset_folder, dataset_json)
    reader = plans_manager.image_reader_writer_class()
    budgets = {}
    for identifier in identifiers:
        data, _ = reader.read_images(files[identifier]['images'])
        seg, _ = reader.read_seg(files[identifier]['label'])
        budgets[identifier] = case_budget(data, seg, plans_manager, configuration_manager, eps, eps_abs, percentiles)
    return budgets


def budgets_from_preprocessed(dataset, identifiers: Iterable[str], eps: float,
                              percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Dict[str, dict]:
    """Fallback without nnUNet_raw: eps x percentile range of the (already normalised) preprocessed case."""
    budgets = {}
    for identifier in identifiers:
        data, seg, _, _ = dataset.load_case(identifier)
        eps_norm = eps * percentile_range(np.asarray(data), percentiles)
        budgets[identifier] = {'raw_budget': None, 'scale': None, 'eps_norm': [float(e) for e in eps_norm],
                               'empty_roi': bool(not np.any(np.asarray(seg) > 0))}
    return budgets


def raw_dataset_folder_or_none(dataset_name: str) -> Optional[str]:
    """$nnUNet_raw/<dataset_name> if it exists."""
    root = os.environ.get('nnUNet_raw')
    folder = os.path.join(root, dataset_name) if root else None
    return folder if folder and os.path.isdir(folder) else None
