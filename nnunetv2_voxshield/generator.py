"""The noise generator G: a small U-Net (dynamic_network_architectures) with a tanh head in [-1, 1].

G(x) is scaled by the per-case budget and masked by the trainer/export (``budget.bound_perturbation``, Eq. 3),
so G itself knows nothing of budgets or labels. All constructor arguments are JSON-serialisable so that a
checkpoint can rebuild the generator without the trainer (``NoiseGenerator(**kwargs)``).
"""
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from dynamic_network_architectures.architectures.unet import PlainConvUNet


class NoiseGenerator(nn.Module):
    """G: a PlainConvUNet (no deep supervision) with one output per input channel and a tanh head; the
    unit-free pattern G(x) in [-1, 1] is scaled and masked by the caller (Eq. 3)."""
    def __init__(self, dims: int, in_channels: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], n_conv_per_stage: int = 1):
        super().__init__()
        assert dims in (2, 3), f'dims must be 2 or 3, got {dims}'
        self.dims = dims
        conv_op = nn.Conv3d if dims == 3 else nn.Conv2d
        norm_op = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
        n_stages = len(features_per_stage)
        self.unet = PlainConvUNet(
            input_channels=in_channels, n_stages=n_stages, features_per_stage=list(features_per_stage),
            conv_op=conv_op, kernel_sizes=[list(k) for k in kernel_sizes], strides=[list(s) for s in strides],
            n_conv_per_stage=n_conv_per_stage, num_classes=in_channels,
            n_conv_per_stage_decoder=n_conv_per_stage, conv_bias=True, norm_op=norm_op,
            norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU, nonlin_kwargs={'inplace': True},
            deep_supervision=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-free noise pattern in [-1, 1] with the shape of x (the trainer multiplies by eps)."""
        return torch.tanh(self.unet(x))


def generator_kwargs_from_plans(configuration_manager, in_channels: int, max_stages: int = 4,
                                feature_divisor: int = 2, max_features: int = 64) -> dict:
    """A generator smaller than the surrogate: its first ``max_stages`` stages, features / ``feature_divisor``."""
    arch = configuration_manager.network_arch_init_kwargs
    n = min(max_stages, arch['n_stages'])
    features: List[int] = [int(max(4, min(max_features, f // feature_divisor))) for f in arch['features_per_stage'][:n]]
    return {
        'dims': len(configuration_manager.patch_size),
        'in_channels': int(in_channels),
        'features_per_stage': features,
        'kernel_sizes': [list(map(int, k)) for k in arch['kernel_sizes'][:n]],
        'strides': [list(map(int, s)) for s in arch['strides'][:n]],
        'n_conv_per_stage': 1,
    }


def run_padded(network: nn.Module, x: torch.Tensor, strides: Sequence[Sequence[int]]) -> torch.Tensor:
    """``network(x)`` for any spatial size: zero-padded to a multiple of the total stride, cropped back."""
    factors = np.prod(np.array(strides), axis=0)
    shape = x.shape[2:]
    pad = [int(-s % f) for s, f in zip(shape, factors)]
    if not any(pad):
        return network(x)
    out = network(F.pad(x, [p for q in reversed(pad) for p in (0, q)]))
    return out[(slice(None), slice(None), *[slice(0, s) for s in shape])]
