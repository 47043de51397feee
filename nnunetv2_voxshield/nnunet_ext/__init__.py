"""The folder nnU-Net crawls for external trainers (``nnUNet_extTrainer``).

It holds one thin module that re-exports our trainer classes; the real code lives in
``nnunetv2_voxshield.trainers`` (repository folder ``trainers/``). ``register()`` is called by the
``nnunetv2_voxshield.pth`` hook at interpreter start and must stay free of heavy imports.
"""
import os

ENV_VAR = 'nnUNet_extTrainer'


def trainer_folder() -> str:
    """Absolute path of the folder to list in ``nnUNet_extTrainer``."""
    return os.path.dirname(os.path.abspath(__file__))


def register() -> None:
    """Append our trainer folder to ``nnUNet_extTrainer`` (idempotent, keeps the user's own entries first)."""
    folder = trainer_folder()
    entries = [p for p in os.environ.get(ENV_VAR, '').split(os.pathsep) if p]
    if folder not in entries:
        os.environ[ENV_VAR] = os.pathsep.join(entries + [folder])


def trainer_path_entry(argv=None):
    """``voxshield_trainer_path``: print the folder for a manual ``export nnUNet_extTrainer=...``."""
    import argparse  # here, not at the top: register() runs at every interpreter start
    argparse.ArgumentParser(description='Print the folder that holds our nnU-Net trainer classes, for '
                                        '"export nnUNet_extTrainer=$nnUNet_extTrainer:$(voxshield_trainer_path)" '
                                        'where the .pth hook that sets $nnUNet_extTrainer is skipped. Reads and '
                                        'writes nothing.').parse_args(argv)
    print(trainer_folder())
