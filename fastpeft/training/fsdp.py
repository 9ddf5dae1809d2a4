"""FSDP2 for the trainer: the frozen base sharded over the ranks with `torch.distributed.fsdp.fully_shard`.

`shard_model` applies `fully_shard` to every decoder layer (the classes a transformers model names in
`_no_split_modules`) and then to the PeftModel as the root unit (embeddings, final norm, LM head).
Each rank then holds 1/world of every parameter (dim-0 shards, DTensors); a unit's parameters are
all-gathered into plain tensors just for its forward and backward, so the fused adapter ops see
ordinary tensors.  Only the adapter parameters have gradients; they are reduce-scattered in fp32
(`MixedPrecisionPolicy(reduce_dtype=float32)`) and the optimizer steps on the local shards.

QLoRA: every fastpeft `Linear4bit` is first laid out for sharding (`Linear4bit.shard_layout`): its packed
codes and its quantisation state's per-block absmax become frozen integer parameters (integer views of
the same bytes, which FSDP2's mixed precision never casts), so each rank holds 1/world of the 4-bit base,
its quantisation state included; the all-gathered codes are dequantised inside the unit as usual.

Checkpoints (see `save_sharded` / `load_sharded`): each rank writes its own shards of the adapter
and of the optimizer state through `torch.distributed.checkpoint` in the safetensors layout
(`HuggingFaceStorageWriter(save_distributed=True)`: one `shard-N-...safetensors` a rank, offsets
in the safetensors header as JSON), read back by `HuggingFaceStorageReader` (safetensors only: no
pickle, unlike DCP's default `.metadata` file).  The adapter file users keep is gathered in full
(`DTensor.full_tensor`, adapter tensors only, never the base) and written by rank 0 in PEFT format.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

SHARDED_DIR = "sharded"  # inside a checkpoint folder: every rank's shards (safetensors)
_MODEL_PREFIX = "model."
_OPTIM_PREFIX = "optimizer."


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `model` (the root unit)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules each given their own FSDP unit: instances of the classes the transformers model lists
    in `_no_split_modules` (LlamaDecoderLayer, ...), else the children of its longest ModuleList."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"fsdp: cannot find the decoder layers of {type(base).__name__} (no _no_split_modules "
                         f"and no nn.ModuleList)")
    return list(max(lists, key=len))


def mixed_precision_dtype(model: nn.Module, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype FSDP all-gathers parameters in: the autocast dtype when training in mixed precision,
    else the frozen weights' dtype when it is not fp32 (one dtype per unit is what FSDP2 gathers), else
    None (fp32 throughout)."""
    if autocast_dtype is not None:
        return autocast_dtype
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    if len(frozen) > 1:
        raise ValueError(f"fsdp: the frozen weights mix dtypes {sorted(map(str, frozen))}; cast the base model to "
                         f"one dtype first")
    dtype = next(iter(frozen), torch.float32)
    return None if dtype == torch.float32 else dtype


def shard_model(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None,
                cpu_offload: bool = False) -> list[nn.Module]:
    """Apply FSDP2 to `model` in place: one unit per decoder layer, then the root.  Parameters are
    gathered in `param_dtype` (None: as stored); gradients are reduced in fp32; `cpu_offload` keeps
    the shards (and the optimizer state) in pinned CPU memory, copied to `device` per unit.  Returns
    the layer units."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cpu_offload and device.type != "cuda":
        raise ValueError(f"fsdp_cpu_offload moves the shards to CPU memory while computing on a GPU; the model is "
                         f"on {device}, where there is nothing to offload")
    from ..nn.linear4bit import Linear4bit, is_4bit_linear

    for name, module in model.named_modules():  # QLoRA: codes and quantisation state as shardable parameters
        if isinstance(module, Linear4bit):
            module.shard_layout()
        elif is_4bit_linear(module):
            raise ValueError(f"fsdp: {name} is a bitsandbytes Linear4bit, whose Params4bit FSDP cannot shard; "
                             f"take the model over with fastpeft.quantize(model) first (same codes, no copy)")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=True) if cpu_offload else OffloadPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mp_policy=mp, offload_policy=offload)
    # the root: after its forward the last layer's parameters are needed again first in the backward
    fully_shard(model, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return layers


def set_gradient_sync(model: nn.Module, on: bool) -> None:
    """Gradient accumulation: no reduce-scatter on the micro-batches before the last (FSDP's no_sync)."""
    model.set_requires_gradient_sync(on)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, _dtensor_type()) else t


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of this rank's parameters: frozen / trainable, local (this rank's shards) and total; a 4-bit
    layer's per-block quantisation state counts as frozen (replicated until `shard_layout` makes it shards)."""
    from ..nn.linear4bit import Linear4bit

    out = {"frozen_local": 0, "frozen_total": 0, "trainable_local": 0, "trainable_total": 0}
    for p in model.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        out[f"{kind}_local"] += _local(p).numel() * p.element_size()
        out[f"{kind}_total"] += p.numel() * p.element_size()
    for m in model.modules():  # a 4-bit layer's per-block quantisation state: parameters once laid out for FSDP
        if isinstance(m, Linear4bit) and m.__dict__.get("_layout") is None:
            qs = m.quant_state
            held = sum(t.numel() * t.element_size() for t in (qs.absmax, qs.nested_absmax) if t is not None)
            out["frozen_local"] += held
            out["frozen_total"] += held
    return out


def full_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole tensors behind `named` (a collective: every rank calls it with the same names, in the
    same order), on the CPU."""
    DTensor = _dtensor_type()
    out = {}
    for name in sorted(named):
        t = named[name].detach()
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu()
    return out


def adapter_keys(model: nn.Module) -> list[str]:
    """State-dict keys that `PeftModel.save_pretrained` reads: every adapter's tensors (plus the base biases
    a LoRA `bias` option saves)."""
    from ..config import LoraConfig

    state = model.state_dict()
    keys: set[str] = set()
    for name, config in model.peft_config.items():
        keys.update(model._adapter_key_map(name, state))
        if isinstance(config, LoraConfig) and config.bias != "none":
            keys.update(k for k in state if k.endswith(".bias"))
    return sorted(keys)


def gather_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor in full (collective), keyed like `model.state_dict()`."""
    state = model.state_dict()
    return full_tensors({k: state[k] for k in adapter_keys(model)})


@contextlib.contextmanager
def gathered_state(model: nn.Module, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, `model.state_dict()` returns the gathered adapter tensors `full` (so PeftModel's own
    `save_pretrained` writes the PEFT file, byte for byte what an unsharded model writes)."""
    def state_dict(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return dict(full)

    model.__dict__["state_dict"] = state_dict
    try:
        yield
    finally:
        model.__dict__.pop("state_dict", None)


def all_finite(named: dict[str, torch.Tensor], group: Any = None) -> str | None:
    """The first name (in `named`'s order) whose tensor holds a NaN/inf on any rank, or None."""
    import torch.distributed as dist

    names = list(named)
    if not names:
        return None
    flags = torch.stack([torch.isfinite(_local(named[n])).all() for n in names]).to(torch.int32).cpu()
    if dist.is_initialized():
        device = next(iter(named.values())).device
        flags = flags.to(device if device.type == "cuda" else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    bad = (flags == 0).nonzero()
    return names[int(bad[0, 0])] if bad.numel() else None


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over sharded gradients: the global norm (a plain tensor, the same on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0, False, None)
    if isinstance(norm, _dtensor_type()):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, None)
    return norm


# ---------------------------------------------------------------------------- sharded checkpoints
def _flat_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors keyed `optimizer.FQN.KEY`, the plain rest: per-parameter non-tensor entries and param_groups)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)  # FQN keys; initialises an empty state (lr 0 step)
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for fqn, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM_PREFIX}{fqn}.{key}"] = value
            else:
                plain.setdefault(fqn, {})[key] = value
    return tensors, {"plain": plain, "param_groups": osd["param_groups"], "fqns": sorted(osd["state"])}


def save_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank writes its shards of the adapter and the optimizer state into `folder/sharded`
    (a collective).  Returns the optimizer's plain-data part (param_groups, ...) for the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from .trainer import _trainable

    tensors, plain = _flat_optimizer(model, optimizer)
    for name, p in _trainable(model).items():
        tensors[_MODEL_PREFIX + name] = p.detach()
    tensors = {k: (v if isinstance(v, _dtensor_type()) or v.dim() else v.reshape(1)) for k, v in tensors.items()}
    plain["scalars"] = sorted(k for k, v in tensors.items() if not isinstance(v, _dtensor_type()) and v.numel() == 1
                              and k.startswith(_OPTIM_PREFIX))
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(os.path.join(folder, SHARDED_DIR),
                                                              save_distributed=True))
    return plain


def load_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, plain: dict[str, Any]) -> None:
    """Read this rank's shards written by `save_sharded` back into the adapter and the optimizer
    (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from .checkpoints import CheckpointError
    from .trainer import _trainable

    path = os.path.join(folder, SHARDED_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{folder} was written without FSDP (no {SHARDED_DIR}/ folder); resume it without fsdp")
    osd = get_optimizer_state_dict(model, optimizer)
    if sorted(osd["state"]) != list(plain.get("fqns", [])):
        raise ValueError(f"checkpoint {folder}: the optimizer state does not fit this model (other parameters)")
    targets: dict[str, torch.Tensor] = {}
    scalars = set(plain.get("scalars", []))
    for fqn, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                name = f"{_OPTIM_PREFIX}{fqn}.{key}"
                targets[name] = value.reshape(1) if name in scalars else value
    params = _trainable(model)
    with torch.no_grad():
        for name, p in params.items():
            targets[_MODEL_PREFIX + name] = p.detach()
        try:
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(path))
        except Exception as err:  # noqa: BLE001 - a missing or damaged shard file, in whichever form DCP raises it
            raise CheckpointError(f"{path}: the sharded state cannot be read ({str(err).splitlines()[0][:300]})") \
                from None
    for fqn, extra in plain.get("plain", {}).items():
        osd["state"][fqn].update(extra)
    osd["param_groups"] = plain["param_groups"]
    set_optimizer_state_dict(model, optimizer, osd)
