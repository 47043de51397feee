"""nnU-Net trainer classes of nnunetv2-voxshield (installed as ``nnunetv2_voxshield.trainers``)."""
from nnunetv2_voxshield.trainers import baselines, eot, eot2d, epochs, eps_variants, lc, victim_profiles, voxshield
from nnunetv2_voxshield.trainers import em_samplewise

_modules = (voxshield, baselines, eot, eot2d, epochs, eps_variants, lc, victim_profiles, em_samplewise)
__all__ = sorted({name for m in _modules for name in vars(m) if name.startswith('nnUNetTrainer') and
                  name != 'nnUNetTrainer' and isinstance(vars(m)[name], type)})
globals().update({name: getattr(m, name) for m in _modules for name in vars(m) if name in __all__})
