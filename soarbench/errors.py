"""User errors: one clear line, non-zero exit, no traceback (the CLI catches UserError)."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input from the user: the message is the whole story and is printed as one line."""


def did_you_mean(kind: str, name: str, valid: Iterable[str]) -> UserError:
    """An error for an unknown name that lists the valid ones and suggests the nearest."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown {kind} '{name}' (valid: {', '.join(valid)}){hint}")
