"""The error of one unusable row, shared by the row mappers (schema.py, tools.py): it sends the row to the
rejects file with its message as the reason."""

from __future__ import annotations


class RowError(ValueError):
    """Why one row cannot be used (it goes to the rejects file)."""
