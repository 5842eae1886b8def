"""The commands beside training: evaluate and predict (inference), and writing shards."""
