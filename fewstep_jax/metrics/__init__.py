"""Sample-quality metrics: distances between sample sets, feature maps, Inception and FID."""
