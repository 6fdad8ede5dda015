"""Build of gradnormlorp_kernels. The compiled extension `gradnormlorp_kernels._C` grows here."""

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
)
