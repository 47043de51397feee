"""Budgets trained, not only exported: ``<Trainer>_eps<N>`` (eps = N/255 of the case's p0.5-p99.5 range) and
``<Trainer>_paperBudget`` (the paper's definition: 4/255 of a +-5 sigma window of the z-scored case,
``budget_mode = 'zscore'``), each with the schedules ``_1/5/10/20epochs``."""
from nnunetv2_voxshield.trainers.eot import nnUNetTrainerVoxShieldEOT
from nnunetv2_voxshield.trainers.epochs import epoch_variant
from nnunetv2_voxshield.trainers.voxshield import nnUNetTrainerVoxShield

BASES = (nnUNetTrainerVoxShield, nnUNetTrainerVoxShieldEOT)
EPS_255 = (10, 16, 64)
EPOCHS = (1, 5, 10, 20)


def budget_variant(base: type, suffix: str, eps: float, budget_mode: str = 'range') -> type:
    """``<base>_<suffix>``: ``base`` trained with budget ``eps`` in ``budget_mode`` (a module-level class)."""
    name = f'{base.__name__}_{suffix}'
    return type(name, (base,), {'eps': eps, 'budget_mode': budget_mode, '__module__': __name__,
                                '__qualname__': name,
                                '__doc__': f'{base.__name__} with eps = {eps:.6g} ({budget_mode} budget).'})


def _module_level(cls: type) -> type:
    cls.__module__ = __name__  # epoch_variant names its own module; these classes live here
    return cls


VARIANTS = [budget_variant(b, f'eps{n}', n / 255) for b in BASES for n in EPS_255] + \
           [budget_variant(b, 'paperBudget', 4 / 255, 'zscore') for b in BASES]
globals().update({cls.__name__: cls for cls in VARIANTS})
globals().update({cls.__name__: cls for cls in (_module_level(epoch_variant(v, e)) for v in VARIANTS for e in EPOCHS)})
