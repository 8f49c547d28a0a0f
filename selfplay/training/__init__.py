"""Training beyond one process: distributed launch (DDP, FSDP, DeepSpeed through accelerate) and LoRA."""
