"""Engines and models: loading policies, chat templates, batching, log-probs, precision, vLLM engines as Ray
actors, the samplers (hf, vllm) and embeddings. selfplay/rewards/ holds the judges (a public path users name)."""
