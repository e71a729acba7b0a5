"""How much memory one full-resolution decode may take: the decode budget."""

from __future__ import annotations

import math
import os

from deepspot.io.slides.errors import SlideError

#: Share of the available memory (MemAvailable) one full-resolution image decode may take; beyond it the
#: image is refused with a hint to convert it. ``DEEPSPOT_DECODE_BUDGET_GB`` sets the budget directly.
DECODE_FRACTION = 0.125


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; else free pages; else 8 GiB)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def decode_budget() -> int:
    """Bytes one full-resolution image decode may take (``DEEPSPOT_DECODE_BUDGET_GB``, else an eighth of the available memory)."""
    env = os.environ.get("DEEPSPOT_DECODE_BUDGET_GB", "").strip()
    if env:
        try:
            gb = float(env)
        except ValueError:
            gb = float("nan")
        if not (math.isfinite(gb) and gb > 0):  # a setting, not the slide: fatal, no other backend tried
            raise SlideError(None, f"DEEPSPOT_DECODE_BUDGET_GB must be a positive number of GB, got {env!r}",
                             fatal=True)
        return int(gb * 1e9)
    return int(DECODE_FRACTION * available_memory())
