"""The version of petl_surgery (read by the build from here, recorded in every delta checkpoint)."""

__version__ = "0.1.0"
