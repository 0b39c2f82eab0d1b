"""Training: config, data, tasks, the loop, checkpoints and metrics."""
