"""Ships the CUDA sources with the package: a wheel or a non-editable install carries csrc/ as
sparsek/csrc/, where sparsek._cuda looks first, so the just-in-time build works outside the
source tree. Everything else is declared in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE_SUFFIXES = (".cu", ".cpp", ".h")


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "sparsek" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(CSRC.iterdir()):
            if src.suffix in SOURCE_SUFFIXES:
                shutil.copy2(src, target / src.name)


setup(cmdclass={"build_py": BuildPyWithKernels})
