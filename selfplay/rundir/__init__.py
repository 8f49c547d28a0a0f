"""The run directory: its names (layout), manifests and atomic commits, shards, checkpoints, fault points."""
