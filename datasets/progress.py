"""The one duration format of the console lines: the converters', `lesa extract`'s and training's.

Here in datasets/ because datasets/ imports nothing of trainer/; trainer/progress.py uses it too.
"""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """Whole seconds as H:MM:SS (`0:01:02`, `27:46:40`); a negative duration is `0:00:00`."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
