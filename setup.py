"""fewstep-jax: distill diffusion / rectified-flow teachers into 1-4 step students in JAX."""

from setuptools import find_packages, setup

# Compatible ranges, so the package installs beside the jax a user already has (a CUDA or TPU
# build, jax 0.10 on Python 3.11 or jax >= 0.11 on Python >= 3.12). The exact versions CI tests
# are in constraints.txt: `pip install -c constraints.txt -e ".[test]"`.
CORE = [
    "jax>=0.10.2",
    "flax>=0.12",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.12",
    "etils[epath]",
    "ml-collections>=1.0",
    "clu>=0.0.12",
    # TensorBoard event files without TensorFlow (fewstep_jax/runs/writers.py); PNG encoding.
    "tensorboard>=2.15",
    "pillow",
    "absl-py",
    "numpy>=1.26",
    "scikit-learn>=1.3",  # the bundled 8x8 digits dataset
    "matplotlib",
]
# Only reading TFDS datasets needs TensorFlow (fewstep_jax/data/tfds_source.py). The CPU wheel
# (Linux x86-64) avoids CUDA and NCCL clashes with jax's own; elsewhere `tensorflow` is CPU-only.
TFDS = [
    "tensorflow-cpu>=2.15; sys_platform == 'linux' and platform_machine == 'x86_64'",
    "tensorflow>=2.15; sys_platform != 'linux' or platform_machine != 'x86_64'",
    "tensorflow-datasets>=4.9",
]
# Export to and import from PyTorch. An unconstrained torch on Linux is the multi-GB CUDA build:
# constraints.txt names the CPU wheel's version.
TORCH = ["torch>=2.1", "diffusers>=0.30", "safetensors>=0.4"]
# Latent text-to-image pipelines (fewstep_jax/pipelines): safetensors weights, the tokenizers'
# own files read by the `tokenizers` (CLIP BPE) and `sentencepiece` (T5) libraries (no torch).
LATENT = ["safetensors>=0.4", "tokenizers>=0.20", "sentencepiece>=0.2"]
# LoRA students (fewstep_jax/lora): Google's qwix intercepts the Linen layers' dot_general / conv
# and adds the low-rank branch (docs/guides/lora.md says why qwix).
LORA = ["qwix>=0.1.8"]
# The PyTorch reference side of the parity tests: transformers' CLIP / T5, peft's LoRA layout.
TEST = ["pytest>=8", "pytest-xdist>=3", "ruff>=0.15", "scipy", "transformers>=5", "peft>=0.15"]

setup(
    name="fewstep-jax",
    version="0.1.0",
    description="Few-step distillation (TraFlow, TCD, TDM and baselines) of diffusion and "
    "rectified-flow teachers in JAX/Flax, with export to PyTorch.",
    packages=find_packages(include=["fewstep_jax", "fewstep_jax.*"]),
    package_data={"fewstep_jax": ["assets/*"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "tfds": TFDS,
        "torch": TORCH,
        "latent": LATENT,
        "lora": LORA,
        "test": TEST + TORCH + TFDS + LATENT + LORA,
    },
    entry_points={"console_scripts": ["fewstep=fewstep_jax.main:run"]},
)
