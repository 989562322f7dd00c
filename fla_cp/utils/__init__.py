"""Helpers shared by the user scripts (tests/cp/*.py): distributed setup, model presets,
checkpoints, metrics. Each module has one job."""
