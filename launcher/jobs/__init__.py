"""The job layer: the CLI, Ray Train and Ray Jobs. It calls the engine (launcher.engine); the
engine never calls it."""
