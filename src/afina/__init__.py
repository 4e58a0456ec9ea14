"""afina: fine-tune a pretrained LLM end to end — prepare, train, evaluate, export, serve."""

__version__ = "0.1.0"
