"""Why a source row cannot be used: the one exception every row rule raises (rows.py, layouts.py). No Ray."""

from __future__ import annotations


class RowProblem(Exception):
    """Why a row cannot be used: a reason code (counted in the manifest), the field and a message."""

    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message
