"""Ships `crowdplay_minari_hdf5plugin.pth` into site-packages.

Converted datasets store frames zstd-compressed (smaller than CrowdPlay's bz2 files and ~35x
faster to read). HDF5 finds the zstd filter through HDF5_PLUGIN_PATH; the .pth line sets it at
interpreter start-up, so a plain `minari.load_dataset(...)` in a fresh process reads the frames
without importing this project first. All other metadata lives in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "crowdplay_minari_hdf5plugin.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path(__file__).parent / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWheelWithPth(editable_wheel):
    """`pip install -e .` ships the same .pth (setuptools writes the editable wheel's root from
    this folder; the hook is private, so a setuptools without it installs no .pth)."""

    def _install_namespaces(self, installation_dir, pth_prefix) -> None:
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copyfile(Path(__file__).parent / PTH, Path(installation_dir) / PTH)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
