"""What a run leaves to read: metrics.jsonl, the trackers (wandb, TensorBoard) and the offline
HTML report. Training imports the trackers, never the report's plotting."""
