"""The trainer: optimizer and schedules, checkpoints, stability guards, metrics, the loop."""
