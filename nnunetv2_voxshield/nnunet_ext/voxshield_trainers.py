"""Re-exports every trainer class of nnunetv2-voxshield for nnU-Net's trainer lookup (no code of its own)."""
from nnunetv2_voxshield.trainers import *  # noqa: F401,F403
