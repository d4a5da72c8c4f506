"""Delta checkpoints: the trainable tensors and the surgery's description, in safetensors."""

from .delta import load_delta, save
from .format import FORMAT_NAME, FORMAT_VERSION

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_delta", "save"]
