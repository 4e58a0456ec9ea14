"""Evaluation: generate answers on the test split and score them, base against tuned."""
