"""Diffusers pipeline folders (model_index.json + one folder per component) read into JAX."""
