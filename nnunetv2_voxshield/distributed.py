"""DDP wrapping of the generator, device-agnostic (NCCL on CUDA as nnU-Net does, gloo on CPU in tests)."""
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def wrap_ddp(module: nn.Module, device: torch.device) -> DDP:
    """Wrap ``module`` (already on ``device``) for data-parallel training; gradients are all-reduced on backward."""
    return DDP(module, device_ids=[device.index if device.index is not None else 0] if device.type == 'cuda' else None)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DDP) else module
