"""The one error every slide failure a user can cause raises."""

from __future__ import annotations

import os
from pathlib import Path


class SlideError(Exception):
    """A slide could not be opened or read; the message names file and reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str, *, fatal: bool = False):
        self.fatal = fatal  # a verdict on the file itself: open_slide tries no other backend
        self.path = None if path is None else Path(path)
        self.reason = str(reason).strip().splitlines()[0] if str(reason).strip() else "unknown error"
        super().__init__(f"{path}: {self.reason}" if path is not None else self.reason)
