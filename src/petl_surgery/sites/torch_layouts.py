"""Layouts of torch_layouts (filled in by issue 3)."""


def register() -> None:
    """Add this module's classes to the registry."""
