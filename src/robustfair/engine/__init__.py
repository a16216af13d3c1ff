"""The training engine, evaluation, checkpoints and schedules."""
