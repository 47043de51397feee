"""Metadata lives in setup.cfg. This file only adds the .pth hook that registers our trainer folder with nnU-Net.

nnU-Net >= 2.8 searches the folders listed in the environment variable ``nnUNet_extTrainer`` for trainers that
are not built in. ``nnunetv2_voxshield.pth`` (installed at the top of site-packages) appends our thin trainer
folder to that variable when Python starts, so stock ``nnUNetv2_train -tr nnUNetTrainerVoxShield`` works after a
plain ``pip install``, for regular and editable installs alike.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = 'nnunetv2_voxshield.pth'
PTH_LINE = 'import nnunetv2_voxshield.nnunet_ext as _voxshield_ext; _voxshield_ext.register()\n'


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        # an editable wheel ignores build_lib; setuptools points install_lib at the wheel being assembled
        folder = self.get_finalized_command('install').install_lib if self.editable_mode else self.build_lib
        self.mkpath(folder)
        with open(os.path.join(folder, PTH_NAME), 'w') as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        mapping[os.path.join(self.build_lib, PTH_NAME)] = PTH_NAME
        return mapping


setup(cmdclass={'build_py': build_py_with_pth})
