"""Checks of the composed config before anything runs, and Hydra's output-folder callback. Imports core, data,
models and train."""
