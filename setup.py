"""fewstep-jax: distill diffusion / rectified-flow teachers into 1-4 step students in JAX."""

from setuptools import find_packages, setup

# Pinned to what CI tests on Python 3.11 (jax >= 0.11 needs Python >= 3.12).
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "clu==0.0.12",
    # clu's metric writers import TensorFlow; the CPU wheel avoids CUDA and NCCL clashes.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "scikit-learn==1.9.1",
    "matplotlib==3.11.2",
    "safetensors==0.8.0",
]
# An unpinned torch pulls a multi-GB CUDA build: 2.13.0 is the CPU wheel.
TORCH = ["torch==2.13.0", "diffusers==0.42.1"]
TEST = ["pytest==9.2.0", "pytest-xdist==3.8.0", "ruff==0.17.6"]

setup(
    name="fewstep-jax",
    version="0.1.0",
    description="Few-step distillation (TraFlow, TCD, TDM and baselines) of diffusion and "
    "rectified-flow teachers in JAX/Flax, with export to PyTorch.",
    packages=find_packages(include=["fewstep_jax", "fewstep_jax.*"]),
    package_data={"fewstep_jax": ["assets/*"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={"torch": TORCH, "test": TEST + TORCH},
    entry_points={"console_scripts": ["fewstep=fewstep_jax.main:run"]},
)
