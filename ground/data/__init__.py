"""Training data: samples, sources and patch layouts, normalisation, augmentation, the run's
dataset, and reference tiles drawn from the run's own imagery."""
