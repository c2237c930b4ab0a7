"""The run: what every training job shares (lifecycle, arguments, optimizers, loop, schedule, checkpoints, folder)."""
