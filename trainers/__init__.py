"""nnU-Net trainer classes of nnunetv2-voxshield (installed as ``nnunetv2_voxshield.trainers``)."""
