"""fastpeft: fused-kernel parameter-efficient fine-tuning, drop-in compatible with HF PEFT."""

__version__ = "0.1.0"

from . import backend, ops
from .backend import get_backend, set_backend, use_backend
