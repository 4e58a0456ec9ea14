"""Export: the adapter alone, or merged into the base as a plain Hugging Face model."""
