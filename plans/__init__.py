"""Plans presets (JSON), installed as ``nnunetv2_voxshield.presets``."""
