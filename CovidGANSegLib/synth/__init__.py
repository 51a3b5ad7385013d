"""Synthetic data (numpy only): Perlin noise, the training lesion model, the evaluation lesion
model (an independent shape process) and the synthetic chest-CT phantom cohort."""
