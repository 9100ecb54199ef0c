"""Training: the diffusion step, stage settings, the per-worker loop, DeepSpeed and Ray Train."""
