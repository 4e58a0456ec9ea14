"""Data preparation: load, map to canonical chat rows, format with masks, split, report."""
