"""tpkernels: Triton kernels, and an optional native extension (`tpkernels._C`, built with ninja).

The extension: TPKERNELS_BUILD_EXT=auto (the default) builds the CPU part wherever a C++ compiler is,
and the CUDA part (cuBLASLt epilogues) where nvcc and a CUDA build of torch are; a failed optional
build prints why in one line and the package installs without it. 1 makes a failed build an error;
0 skips it. Building imports torch, so install with the torch you run, without build isolation:

    pip install torch ninja setuptools wheel && pip install --no-build-isolation -e .
"""
import os
import sys

from setuptools import find_packages, setup

MODE = os.environ.get("TPKERNELS_BUILD_EXT", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"TPKERNELS_BUILD_EXT={MODE!r}: use auto, 0 or 1")


def extensions():
    """([extension], {"build_ext": BuildExtension}), or nothing when the build is off or impossible."""
    if MODE == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:  # build isolation without torch, say
        if MODE == "1":
            raise
        print(f"tpkernels: native extension skipped: torch is not importable at build time ({error}); "
              f"install with --no-build-isolation", file=sys.stderr)
        return [], {}
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    return [_extension(cpp_extension, cuda)], {"build_ext": _tolerant(cpp_extension)}


def _extension(cpp_extension, cuda):
    if not cuda:
        return cpp_extension.CppExtension("tpkernels._C", ["csrc/tpkernels.cpp"], extra_compile_args=["-O3", "-std=c++17"])
    return cpp_extension.CUDAExtension(
        "tpkernels._C", ["csrc/tpkernels.cpp", "csrc/cuda/ops_cuda.cpp", "csrc/cuda/cublaslt_epilogue.cu"],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]}, libraries=["cublasLt"])


def _tolerant(cpp_extension):
    """BuildExtension that, in auto mode, reports a failed build in one line (`pip install -v` shows it)
    and installs the package without the extension."""

    class Build(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as error:  # a compiler error, a missing ninja or header
                if MODE == "1":
                    raise
                print(f"tpkernels: native extension not built ({_first_line(error)}); the Triton and eager paths "
                      f"still work. TPKERNELS_BUILD_EXT=1 shows the whole error; =0 skips the build",
                      file=sys.stderr)

    return Build.with_options(use_ninja=True)


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


ext_modules, cmdclass = extensions()
setup(
    name="tpkernels",
    version="0.1.0",
    description="Fused Triton kernels and torch.nn modules for tensor-parallel transformer MLPs",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tpkernels", "tpkernels.*"]),
    package_data={"tpkernels": ["backend_table.json", "backend_table_cpu.json", "kernel_table.json"]},
    python_requires=">=3.10",
    # numpy: triton's interpreter (TRITON_INTERPRET=1, the CPU path) imports it, and so does the kernels'
    # module, which checks whether it was decorated under the interpreter. safetensors: save_sharded and
    # load_sharded read and write its files (an ImportError at a user's first checkpoint without it).
    install_requires=["torch>=2.6", "triton>=3.6", "numpy", "safetensors"],
    # transformers: the tests of parallelize and load_sharded on real model code
    extras_require={"test": ["pytest", "transformers"], "bench": ["matplotlib", "tqdm"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
