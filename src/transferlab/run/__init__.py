"""A run folder: the pipeline and its plan, one stage's runner, the manifest, attempts, the stage cache, the run
lock, signals, SLURM, the results table. Imports config, train, data, models and core."""
