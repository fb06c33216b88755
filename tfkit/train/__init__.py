"""Training and inference on top of ``tfkit.models``: optimizer, loop, checkpoints, evaluation, sampling."""
