"""What a person reads: the run report, each round's data card, the comparison report, status, experiment
tracking, and the one plotting helper they share."""
