"""The algorithms as pure functions on tables: selection metrics, statistics, prompt-evolution filters."""
