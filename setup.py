"""Ships the CUDA sources with the package, and optionally the compiled kernels.

- Always: a wheel or a non-editable install carries csrc/ as sparsek/csrc/, where sparsek._cuda
  looks first, so the just-in-time build works outside the source tree.
- With SPARSEK_BUILD_CUDA=1 (and torch plus nvcc in the build environment, so build with
  `pip wheel --no-build-isolation .`): the extension is also compiled ahead of time for sm_90a, as
  sparsek/_C*.so, which sparsek._cuda loads instead of building on first use. Off by default, as
  flash-attn's FLASH_ATTENTION_SKIP_CUDA_BUILD is the other way round: a plain `pip install .`
  must work on a machine without nvcc or torch at build time.

Everything else is declared in pyproject.toml."""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCE_SUFFIXES = (".cu", ".cpp", ".h")


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "sparsek" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted(CSRC.iterdir()):
            if src.suffix in SOURCE_SUFFIXES:
                shutil.copy2(src, target / src.name)


def cuda_extension() -> dict:
    """The ahead-of-time extension's setup() arguments, when SPARSEK_BUILD_CUDA=1."""
    flag = os.environ.get("SPARSEK_BUILD_CUDA", "0")
    if flag not in ("0", "1"):
        raise SystemExit(f"SPARSEK_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit("SPARSEK_BUILD_CUDA=1 needs torch in the build environment: "
                         "pip wheel --no-build-isolation . (with torch installed)") from exc
    # The flags the just-in-time build uses, from the one place that lists them.
    spec = importlib.util.spec_from_file_location("sparsek_flags", ROOT / "sparsek" / "_flags.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    sources = ["csrc/binding.cpp", *sorted(f"csrc/{p.name}" for p in CSRC.glob("*.cu"))]
    ext = CUDAExtension(
        "sparsek._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": flags.CXX_FLAGS, "nvcc": flags.CUDA_FLAGS},
    )
    return {"ext_modules": [ext], "build_ext": BuildExtension}


extension = cuda_extension()
setup(
    cmdclass={"build_py": BuildPyWithKernels, **({"build_ext": extension["build_ext"]} if extension else {})},
    ext_modules=extension.get("ext_modules", []),
)
