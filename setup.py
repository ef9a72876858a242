from setuptools import find_packages, setup

setup(
    name="tpkernels",
    version="0.1.0",
    description="Fused Triton kernels and torch.nn modules for tensor-parallel transformer MLPs",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tpkernels", "tpkernels.*"]),
    python_requires=">=3.10",
    # numpy: triton's interpreter (TRITON_INTERPRET=1, the CPU path) imports it, and so does the kernels'
    # module, which checks whether it was decorated under the interpreter.
    install_requires=["torch>=2.6", "triton>=3.4", "numpy"],
    extras_require={"test": ["pytest"], "bench": ["matplotlib", "tqdm"]},
)
