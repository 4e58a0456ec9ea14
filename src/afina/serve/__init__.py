"""An OpenAI-compatible HTTP server for a run or a model."""
