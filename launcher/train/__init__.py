"""Training: the trainer and its parts (the run's state, the policies in guards), the three step
styles, the pre-flight check, the evaluation pass and task metrics, the plan."""
