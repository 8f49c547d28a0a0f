"""The runner: the loop over rounds and stages (pipeline), the compare experiment, SLURM submission, offline
selection, sweeps and the run lock. Imports stages and everything below; nothing below imports it."""
