"""Reading finished runs: the sweep report and its plots, source ranking and transferability scores. Imports run,
train, data, models and core (never commands)."""
