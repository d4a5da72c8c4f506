"""Old spellings of public arguments, kept for one release: they work and warn with the new spelling."""

from __future__ import annotations

import warnings


def renamed(function: str, old: str, new: str) -> None:
    """Warn that ``function``'s argument ``old`` is now ``new`` (a FutureWarning, which Python shows to
    users by default, pointing at the caller of ``function``)."""
    warnings.warn(
        f"{function}({old}=...) is deprecated and will be removed in the next release; use {function}({new}=...)",
        FutureWarning,
        stacklevel=3,
    )
