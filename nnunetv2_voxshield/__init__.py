"""nnunetv2-voxshield: publish nnU-Net datasets as unlearnable examples (VoxShield, arXiv 2605.17345).

Kept import-light on purpose: the .pth hook imports ``nnunetv2_voxshield.nnunet_ext`` at every Python start.
"""
__version__ = '0.1.0'
