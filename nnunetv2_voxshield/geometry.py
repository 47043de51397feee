"""Raw <-> preprocessed geometry with nnU-Net's own functions.

Forward: nnU-Net's preprocessor (transpose, crop to nonzero, normalise, resample). Backward, as
``inference/export_prediction.py`` reverts a prediction: resample to the cropped shape (the plan's
``resampling_fn_probabilities``), insert into the bounding box, ``transpose_backward``.
"""
from typing import Tuple

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

from nnunetv2_voxshield.budget import normalisation_scale


def preprocess_case(data: np.ndarray, seg: np.ndarray, properties: dict, plans_manager, configuration_manager,
                    dataset_json: dict) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Exactly nnU-Net's preprocessing of one case for this configuration; ``properties`` gains the bbox etc."""
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    return preprocessor.run_case_npy(data, seg, properties, plans_manager, configuration_manager, dataset_json)


def normalisation_scales(data: np.ndarray, seg: np.ndarray, plans_manager, configuration_manager) -> np.ndarray:
    """Per channel: normalised units per raw unit, as nnU-Net's normalisation of this case computes it."""
    axes = [0, *[i + 1 for i in plans_manager.transpose_forward]]
    cropped, cropped_seg, _ = crop_to_nonzero(data.astype(np.float32).transpose(axes),
                                              seg.astype(np.int16).transpose(axes))  # signed: crop writes -1
    props = plans_manager.foreground_intensity_properties_per_channel
    return np.array([normalisation_scale(cropped[c], cropped_seg[0], configuration_manager.normalization_schemes[c],
                                         configuration_manager.use_mask_for_norm[c], props.get(str(c)))
                     for c in range(data.shape[0])], dtype=np.float64)


def to_raw_geometry(array: np.ndarray, properties: dict, plans_manager, configuration_manager) -> np.ndarray:
    """(c, *preprocessed shape) -> (c, *raw shape): inverse resampling, un-crop (zeros outside), transpose back."""
    spacing_transposed = [properties['spacing'][i] for i in plans_manager.transpose_forward]
    shape_cropped = properties['shape_after_cropping_and_before_resampling']
    current_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape_cropped) \
        else [spacing_transposed[0], *configuration_manager.spacing]
    if tuple(array.shape[1:]) != tuple(shape_cropped):
        array = configuration_manager.resampling_fn_probabilities(array, shape_cropped, current_spacing,
                                                                  spacing_transposed)
    array = np.asarray(array, dtype=np.float32)
    full = np.zeros((array.shape[0], *properties['shape_before_cropping']), dtype=np.float32)
    full = insert_crop_into_image(full, array, properties['bbox_used_for_cropping'])
    return full.transpose([0, *[i + 1 for i in plans_manager.transpose_backward]])
