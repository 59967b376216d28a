"""Text side of the latent text-to-image models: tokenizers read from a pipeline folder."""
