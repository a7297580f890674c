"""What the ServerApp process runs: the census, the reply screens, the strategies, how a
round closes (evaluation, checkpoints, logs), resume state and the run directory."""
