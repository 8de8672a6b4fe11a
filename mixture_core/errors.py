"""Errors that name the file and what is wrong with it."""

from __future__ import annotations

import os


class WeightFileError(ValueError):
    """A weight file could not be used. The message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str, details: list[str] | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.details = list(details or [])
        where = f"{os.path.basename(self.path)}: " if self.path else ""
        text = where + problem
        if self.details:
            shown = self.details[:5]
            more = len(self.details) - len(shown)
            text += "\n  " + "\n  ".join(shown)
            if more > 0:
                text += f"\n  ... and {more} more"
        if self.path:
            text += f"\n  (file: {self.path})"
        super().__init__(text)
