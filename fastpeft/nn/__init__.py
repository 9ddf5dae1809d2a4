"""Drop-in torch.nn modules that hold adapter parameters and call fastpeft.ops."""

from ._base import ModulesToSaveWrapper
from .ia3 import IA3Linear
from .lora import LoraLinear

__all__ = ["LoraLinear", "IA3Linear", "ModulesToSaveWrapper"]
