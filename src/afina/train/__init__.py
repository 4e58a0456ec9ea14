"""Training: batches, the loss, the loop."""
