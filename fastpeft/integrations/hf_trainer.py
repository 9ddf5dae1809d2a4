"""transformers' Trainer and TRL see a fastpeft model as a PEFT model.

The mechanism: when the `peft` package is installed, every fastpeft PeftModel's class is, at the end of its
`__init__`, switched to a subclass of (its own fastpeft class, `peft.PeftModel`) with the same name.  Why this:

* transformers decides "this is a PEFT model" by `isinstance(model, peft.PeftModel)` alone
  (`trainer_utils._is_peft_model`, `Trainer._save`'s `supported_classes`, the resume and best-model paths),
  and so do accelerate (`accelerate.utils.is_peft_model`) and TRL (`SFTTrainer`, `add_fused_lm_head`).
  `peft.PeftModel` is a plain class (no ABC, no `__instancecheck__` hook), so a registration is impossible,
  and patching each library's check would break with their next release.  A real subclass passes every
  such check, in every library, with no patching.
* fastpeft's own methods come first in the MRO, so save_pretrained / load_adapter / forward / ... are
  fastpeft's (its files, its checks, its layers); `peft.PeftModel` only contributes methods fastpeft does
  not define, which transformers does not call.  Its properties of the names fastpeft stores
  (`peft_config`, `active_adapters`, ...) are shadowed by fastpeft properties.
* `peft` stays optional: without it (or with FASTPEFT_PEFT_CLASS=0) the class is left alone.

Instances stay `fastpeft.PeftModel` instances (`isinstance` holds both ways); `type(model).__name__` is
unchanged.
"""

from __future__ import annotations

import importlib.util
import os

_COMPAT: dict[type, type] = {}


def _peft_model_class() -> type | None:
    if os.environ.get("FASTPEFT_PEFT_CLASS", "1") == "0":
        return None
    try:
        if importlib.util.find_spec("peft") is None:
            return None
        import peft
    except Exception:  # noqa: BLE001 - a broken peft install must not break fastpeft
        return None
    return getattr(peft, "PeftModel", None)


def peft_compatible_class(cls: type) -> type:
    """`cls`, or (when peft is installed) a subclass of `cls` and `peft.PeftModel` with `cls`'s name."""
    base = _peft_model_class()
    if base is None or issubclass(cls, base):
        return cls
    if cls not in _COMPAT:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
                     "__reduce_ex__": _reduce_ex}
        # peft.PeftModel's own methods that fastpeft does not implement would run PEFT's code on fastpeft's
        # internals (its tuner, its layers): each says so instead
        for name, value in vars(base).items():
            if callable(getattr(value, "__func__", value)) and not name.startswith("__") and not hasattr(cls, name):
                namespace[name] = _not_in_fastpeft(name)
        _COMPAT[cls] = type(cls.__name__, (cls, base), namespace)
    return _COMPAT[cls]


def _not_in_fastpeft(name: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(f"peft.PeftModel.{name} is not implemented by fastpeft's {type(self).__name__} "
                                  f"(its class derives from peft.PeftModel only so that transformers and TRL "
                                  f"recognise it)")
    method.__name__ = name
    return method


def _reduce_ex(self, protocol):  # pickle / deepcopy by the plain fastpeft class, which pickle can find by name
    plain = next(c for c in type(self).__mro__[1:] if c.__module__.startswith("fastpeft"))
    return _rebuild, (plain, self.__dict__.copy())


def _rebuild(plain: type, state: dict):
    obj = plain.__new__(plain)
    obj.__setstate__(state)  # nn.Module's
    obj.__class__ = peft_compatible_class(plain)
    return obj
