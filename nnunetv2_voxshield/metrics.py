"""Image-quality and segmentation metrics (maintained implementations where they exist)."""
from typing import Optional

import numpy as np
from skimage.metrics import structural_similarity


def data_range_of(clean: np.ndarray) -> float:
    """Dynamic range used for PSNR/SSIM: max - min of the clean image (at least 1e-8)."""
    return max(float(np.max(clean)) - float(np.min(clean)), 1e-8)


def psnr(clean: np.ndarray, protected: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """PSNR in dB over the whole volume or inside ``mask``; inf when identical, nan for an empty mask."""
    clean = np.asarray(clean, dtype=np.float64)
    diff = np.asarray(protected, dtype=np.float64) - clean
    if mask is not None:
        if not np.any(mask):
            return float('nan')
        diff = diff[np.broadcast_to(mask, diff.shape)]
    mse = float(np.mean(diff ** 2))
    if mse == 0:
        return float('inf')
    return 10 * np.log10(data_range_of(clean) ** 2 / mse)


def ssim(clean: np.ndarray, protected: np.ndarray) -> float:
    """Mean SSIM (scikit-image) over the volume, data range from the clean image; window shrinks for tiny axes."""
    clean = np.asarray(clean, dtype=np.float64)
    protected = np.asarray(protected, dtype=np.float64)
    win = min(7, *[s if s % 2 else s - 1 for s in clean.shape])
    if win < 3:
        return float(np.allclose(clean, protected))
    return float(structural_similarity(clean, protected, data_range=data_range_of(clean), win_size=win))
