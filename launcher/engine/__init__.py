"""The engine: config, DeepSpeed wrapping, the training loop and step, checkpoints, evaluation,
EMA, metrics. It never imports the job layer (launcher.jobs)."""
