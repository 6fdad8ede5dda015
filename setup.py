"""Build of gradnormlorp_kernels, with its compiled extension `gradnormlorp_kernels._C`.

The extension (csrc/) is built with torch's cpp_extension against the torch in the build environment
(build with --no-build-isolation): C++ kernels always, CUDA kernels too when that torch has CUDA and
nvcc is found. Environment:
  GRADNORMLORP_NO_EXTENSION=1       pure-Python package (the reference and Triton backends only)
  GRADNORMLORP_NO_CUDA=1            C++ kernels only, even where CUDA could be built
  GRADNORMLORP_REQUIRE_EXTENSION=1  fail the build if the extension fails (CI); otherwise a failed
                                    extension build leaves a working package without it
  TORCH_CUDA_ARCH_LIST              GPU architectures (default "8.0;8.6;8.9;9.0")
"""

import glob
import os
import sys

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.11",
    "numpy",
    "bitsandbytes>=0.45",
    "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    "tqdm",
    "matplotlib",
]
EXTRAS = {
    "bench": ["galore-torch", "peft", "transformers"],
    "test": ["pytest", "pytest-benchmark", "hypothesis", "peft", "transformers", "galore-torch"],
}
EXTRAS["dev"] = sorted(set(EXTRAS["bench"]) | set(EXTRAS["test"]))

DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"
CSRC = "csrc/gradnormlorp_kernels"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _extension_build():
    """(ext_modules, cmdclass) for the compiled extension, or nothing for a pure-Python build."""
    if _flag("GRADNORMLORP_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError:
        if _flag("GRADNORMLORP_REQUIRE_EXTENSION"):
            raise
        print("gradnormlorp: torch is not importable at build time, building without the extension "
              "(build with --no-build-isolation to get it)", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A compiler problem costs the compiled backends, not the package (unless the build requires them)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if _flag("GRADNORMLORP_REQUIRE_EXTENSION"):
                    raise
                print(f"gradnormlorp: building {ext.name} failed ({exc}); the package works without it "
                      "(gradnormlorp_kernels.backends() says so)", file=sys.stderr)

    # pip installs ninja next to the interpreter, which is not on PATH when the venv is not activated.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    sources = sorted(glob.glob(f"{CSRC}/*.cpp"))
    # -g0: Python's own CFLAGS ask for debug info, which slows the build and bloats the .so.
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("GRADNORMLORP_NO_CUDA")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        extension = CUDAExtension(
            "gradnormlorp_kernels._C",
            sources + sorted(glob.glob(f"{CSRC}/cuda/*.cu")),  # own folder: foo.cpp and foo.cu need distinct foo.o
            define_macros=[("GRADNORMLORP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(
            "gradnormlorp_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _extension_build()

setup(
    name="gradnormlorp-kernels",
    version="0.1.0",
    description="GradNormLoRP: weight-normalised low-rank adaptation with projected 8-bit Adam, with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gradnormlorp_kernels", "gradnormlorp_kernels.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["gradnormlorp=gradnormlorp_kernels.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
