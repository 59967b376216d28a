"""fewstep-jax: few-step distillation of diffusion and rectified-flow teachers in JAX/Flax."""

__version__ = "0.1.0"
