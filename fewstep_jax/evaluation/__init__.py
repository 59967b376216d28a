"""Evaluation: sample-quality metrics, fixed feature spaces and FID."""
