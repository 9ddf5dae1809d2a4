"""Causal-LM fine-tuning of a PeftModel with any method (LoRA, IA3, prefix, prompt, P-tuning).

One optimizer step consumes a global batch of `batch_size × grad_accum × world_size` examples taken
in a seeded per-epoch order (partial global batches at an epoch's end are dropped).  The loss of a
step is the mean over every target token of the global batch:

    loss = Σ_tokens CE / N_targets(global batch)

so gradient accumulation and data parallelism give the same update as one big batch.  AdamW with a
linear warm-up then cosine decay; gradients clipped by global norm; bf16/fp16 autocast (fp16 with a
GradScaler); trainable parameters kept in fp32.  Checkpoints hold the adapter in PEFT format
(`save_pretrained`) plus `trainer_state.pt` (trainable tensors, optimizer, scheduler, scaler, step,
RNG states of every rank, all plain data read back with `weights_only=True`), so a resumed run
continues the schedule, data order and dropout stream exactly (given the same options; a longer
--steps on resume stretches the cosine from there on).

Faults (see `checkpoints`, `preemption`, `runlock`): a checkpoint is written as a set (temp folder,
fsync, rename) and a failed write (full disk, no permission) raises `CheckpointWriteError` with the
partial folder removed; resume='latest' skips a truncated or corrupt newest checkpoint with a warning;
a non-finite loss, gradient norm or adapter weight stops training with `NonFiniteLossError` before
anything non-finite is saved; SIGTERM/SIGINT/SIGUSR1 stop after the current step with a checkpoint
(`TrainingPreempted`; under torchrun all ranks stop at the same step); one run per output folder
(`RunLockedError`).

Past one GPU: under `torchrun` (WORLD_SIZE > 1) the process group is initialised (nccl on CUDA, gloo
on CPU) and each rank reads its share of every global batch; only rank 0 prints and writes the
adapter; every rank's RNG state goes into the checkpoint.  By default the PeftModel is wrapped in
DistributedDataParallel, which all-reduces only the adapter gradients (a frozen base that fits one
device is replicated).  `fsdp=True` shards the base instead (FSDP2 `fully_shard` per decoder layer plus
the root, see `.fsdp`): each rank holds 1/world of the frozen weights, adapters are gathered in full
for the PEFT file, and the optimizer state is checkpointed as per-rank shards through
`torch.distributed.checkpoint`.  The process group this trainer opened is destroyed when the process
exits (or by `Trainer.close()`), after all ranks reach the same point: a rank that leaves with gloo's
threads running aborts ("terminate called without an active exception").

Dropout masks do not depend on the number of processes: before each micro-batch the torch generator is
seeded from (seed, step, the micro-batch's slot in the global batch), so one process with
`grad_accum × world` micro-batches of the same size draws, row for row, the masks the ranks draw, and a
resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import numbers
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..config import PeftConfig, PeftType
from ..peft_model import PeftModel, get_peft_model
from .checkpoints import (CHECKPOINT_PREFIX, STATE_JSON, STATE_NAME, CheckpointError,  # noqa: F401 (STATE_NAME)
                          CheckpointWriteError, check_writable, fmt_bytes, free_bytes, list_checkpoints, pack_rng,
                          read_state, serialize, unpack_rng, write_checkpoint, write_error)
from .data import Example, collate, epoch_order, load_examples, pad_token_id, split_eval
from .preemption import PreemptionGuard, TrainingPreempted
from .runlock import acquire_run_lock, release_run_lock
from .tokenizer import ByteTokenizer

__all__ = ["TrainArgs", "TrainResult", "Trainer", "train", "find_checkpoint", "lr_lambda", "NonFiniteLossError",
           "TrainingPreempted", "CheckpointError", "CheckpointWriteError"]
_AUTOCAST = {"no": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


OPTIMIZERS = ("adamw", "lomo", "adalomo")


@dataclass
class TrainArgs:
    """Options of `train` / `Trainer` (the CLI flags of `fastpeft train` map onto these)."""

    output_dir: str | None = None          # checkpoints + final adapter; None: nothing written
    max_steps: int | None = None           # optimizer steps; None: `epochs` passes over the data
    epochs: int = 1
    batch_size: int = 8                    # examples per micro-batch per process
    grad_accum: int = 1                    # micro-batches per optimizer step
    max_seq_len: int = 512                 # longer sequences are truncated (counted in a warning)
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"               # "adamw" | "lomo" | "adalomo" (the update fused into the backward)
    warmup_steps: int | None = None        # None: warmup_ratio × total steps
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0              # cosine decays to learning_rate × min_lr_ratio
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"            # "no" | "bf16" | "fp16" (autocast)
    gradient_checkpointing: bool = False   # not with prefix tuning; per decoder layer (also under fsdp)
    fsdp: bool = False                     # under torchrun: shard the base with FSDP2 instead of DDP
    fsdp_cpu_offload: bool = False         # with fsdp on CUDA: keep shards and optimizer state in CPU memory
    eval_every: int | None = None          # steps between evaluations (and one at the end)
    eval_fraction: float | None = None     # hold out this share of the training data when no eval data
    save_every: int | None = None          # steps between checkpoints (and the final adapter at the end)
    keep_checkpoints: int | None = None    # keep only the newest N checkpoints
    resume: str | None = None              # "latest" (newest checkpoint in output_dir, if any) or a folder
    log_every: int = 10
    seed: int = 0
    device: str | None = None              # default: cuda:LOCAL_RANK when CUDA is usable, else cpu
    progress: bool = True                  # progress bar / log lines on stderr (rank 0)

    def __post_init__(self):
        if self.mixed_precision not in _AUTOCAST:
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "max_seq_len"):
            _check_int(self, name, 1, optional=False)
        for name in ("max_steps", "eval_every", "save_every", "keep_checkpoints"):
            _check_int(self, name, 1, optional=True)
        _check_int(self, "warmup_steps", 0, optional=True)
        _check_int(self, "seed", 0, optional=False)
        if not _finite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and (not _finite(self.max_grad_norm) or self.max_grad_norm < 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0 or None: no clipping), got "
                             f"{self.max_grad_norm}")
        if not _finite(self.warmup_ratio) or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not _finite(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.eval_fraction is not None and (not _finite(self.eval_fraction) or not 0.0 < self.eval_fraction < 1.0):
            raise ValueError(f"eval_fraction must be in (0, 1) or None, got {self.eval_fraction}")
        self.betas = tuple(self.betas)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer != "adamw":
            # the update runs in the backward, one parameter at a time: nothing to accumulate or all-reduce first
            if self.grad_accum != 1:
                raise ValueError(f"optimizer={self.optimizer!r} updates each parameter during the backward, so it "
                                 f"cannot accumulate gradients over micro-batches: use grad_accum=1 (got "
                                 f"{self.grad_accum})")
            if self.fsdp:
                raise ValueError(f"optimizer={self.optimizer!r} does not work with fsdp=True (sharded gradients are "
                                 "reduced after the backward, LoMo updates during it)")
            if self.mixed_precision == "fp16":
                raise ValueError(f"optimizer={self.optimizer!r} trains in fp32 or bf16 (mixed_precision 'no' or "
                                 "'bf16')")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ValueError("fsdp_cpu_offload needs fsdp=True")
        if self.fsdp and self.mixed_precision == "fp16":
            raise ValueError("fsdp=True trains in fp32 or bf16 (mixed_precision 'no' or 'bf16'); fp16 needs a loss "
                             "scaler over sharded gradients, which this trainer does not have")
        if len(self.betas) != 2 or not all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(args: "TrainArgs", name: str, low: int, optional: bool) -> None:
    value = getattr(args, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be >= {low}{' or None' if optional else ''} (an integer), got {value!r}")


@dataclass
class TrainResult:
    global_step: int
    train_loss: float | None                # mean loss of the last logging window
    eval_loss: float | None
    seconds: float
    tokens: int                             # tokens (prompt + completion) seen, all processes
    trainable_params: int
    peak_memory_bytes: int
    history: list[dict[str, float]] = field(default_factory=list)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------- distributed
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


_OWNED_GROUP: list[bool] = []  # [True] once this module opened the default process group
_CLEAN_END: list[bool] = []    # [True] while the last Trainer.train() of this process returned normally


def _init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if not _OWNED_GROUP:
            _OWNED_GROUP.append(True)
            atexit.register(lambda: shutdown_distributed(barrier=bool(_CLEAN_END)))
    d = _dist()
    rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
    if device is None:
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if d else "cuda"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index if dev.index is not None else 0)
    return rank, world, dev


def shutdown_distributed(barrier: bool = True) -> None:
    """Destroy the process group this module opened (a no-op otherwise, or when already destroyed).
    With `barrier`, first wait (bounded) until every rank gets here, so that no rank tears its
    connections down while another still talks to it.  Registered to run at interpreter exit (with the
    barrier only after a training run that ended normally: after a failure a peer may never come),
    before Python's finalisation would destroy gloo's threads unjoined."""
    if not _OWNED_GROUP:
        return
    d = _dist()
    if d is None:
        return
    if barrier:
        with contextlib.suppress(Exception):  # a rank that died: leave without waiting for it
            if d.get_backend() == "gloo":
                import datetime

                d.monitored_barrier(timeout=datetime.timedelta(seconds=30), wait_all_ranks=True)
            else:
                d.barrier()
    with contextlib.suppress(Exception):
        d.destroy_process_group()


def _micro_batch_seed(seed: int, step: int, slot: int) -> int:
    """The torch seed of micro-batch `slot` (k × world + rank) of optimizer step `step`."""
    return (seed * 1_000_003 + step) * 4099 + slot + 1


# ---------------------------------------------------------------------------- checkpoints
def find_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint folder under `output_dir` (holding a trainer state), or None."""
    found = list_checkpoints(output_dir)
    return found[0] if found else None


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss, the gradients or the adapter weights turned NaN/inf; nothing
    non-finite was saved and `checkpoint` (the newest checkpoint, if any) is the last good state."""

    def __init__(self, message: str, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """Fine-tunes `model` (a PeftModel, or a base model plus `peft_config`) on causal-LM data.

    `train_dataset` / `eval_dataset`: a JSONL path, or a sequence of records (`str`, `{"text"}`,
    `{"prompt", "completion"}`, `{"input_ids"[, "labels"]}`).  `tokenizer` defaults to the byte
    tokenizer.  `callbacks` are called as `cb(trainer, logs)` after every optimizer step.
    """

    def __init__(self, model: nn.Module, args: TrainArgs | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, peft_config: PeftConfig | None = None, tokenizer: Any = None,
                 callbacks: list[Callable[["Trainer", dict], None]] | None = None) -> None:
        self.args = args = args or TrainArgs()
        if train_dataset is None:
            raise ValueError("train_dataset is required (a JSONL path or a sequence of records)")
        self.rank, self.world_size, self.device = _init_distributed(args.device)
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.callbacks = list(callbacks or [])
        self.history: list[dict[str, float]] = []
        self.global_step = 0
        self._saved_step = -1  # the step of the newest checkpoint this trainer wrote or loaded
        self.stop = False  # a callback may set this to end training after the current step

        # the same seed on every rank: identical adapter initialisation
        torch.manual_seed(args.seed)
        # {name: data}: one adapter per name, all trained in one run through mixed-adapter batches
        self.adapter_names = _adapter_datasets(train_dataset, eval_dataset)
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError("model is already a PeftModel; do not pass peft_config too")
            self.model = model
        else:
            if peft_config is None:
                raise ValueError("pass a PeftModel, or a base model together with peft_config")
            if self.adapter_names:
                first, *rest = self.adapter_names
                self.model = get_peft_model(model, peft_config, adapter_name=first)
                for name in rest:
                    self.model.add_adapter(name, peft_config)
            else:
                self.model = get_peft_model(model, peft_config)
        if self.adapter_names:
            _train_adapters(self.model, self.adapter_names)
        if args.gradient_checkpointing and self.model.peft_type == PeftType.PREFIX_TUNING:
            raise ValueError("gradient checkpointing does not work with prefix tuning (the prefix is passed as "
                             "past key/values); turn one of them off")
        self.model.to(self.device)
        for p in _trainable(self.model).values():
            if p.dtype != torch.float32:
                p.data = p.data.float()
        self.trainable_params = sum(p.numel() for p in _trainable(self.model).values())
        if self.trainable_params == 0:
            raise ValueError("the model has no trainable parameters (was the adapter loaded with is_trainable=False?)")
        self.fsdp = False
        if args.fsdp:
            self._shard()

        self.pad_id = pad_token_id(self.tokenizer)
        if self.adapter_names:
            self.train_examples, self.eval_examples = [], []
            for name in self.adapter_names:
                train = _tagged(load_examples(train_dataset[name], self.tokenizer, args.max_seq_len,
                                              f"train data of adapter {name!r}"), name)
                held: list[Example] = []
                if eval_dataset is not None:
                    held = _tagged(load_examples(eval_dataset[name], self.tokenizer, args.max_seq_len,
                                                 f"eval data of adapter {name!r}"), name)
                elif args.eval_fraction:
                    train, held = split_eval(train, args.eval_fraction, args.seed)
                self.train_examples += train
                self.eval_examples += held
        else:
            self.train_examples = load_examples(train_dataset, self.tokenizer, args.max_seq_len, "train data")
            if eval_dataset is not None:
                self.eval_examples = load_examples(eval_dataset, self.tokenizer, args.max_seq_len, "eval data")
            elif args.eval_fraction:
                self.train_examples, self.eval_examples = split_eval(self.train_examples, args.eval_fraction,
                                                                     args.seed)
            else:
                self.eval_examples = []
        self._check_vocab()

        self.global_batch = args.batch_size * args.grad_accum * self.world_size
        self.steps_per_epoch = len(self.train_examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training data has {len(self.train_examples)} examples, fewer than one global "
                             f"batch (batch_size {args.batch_size} × grad_accum {args.grad_accum} × "
                             f"{self.world_size} process(es) = {self.global_batch})")
        self.total_steps = args.max_steps or args.epochs * self.steps_per_epoch
        warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * self.total_steps)
        self.warmup_steps = min(warmup, self.total_steps)

        params = list(_trainable(self.model).values())
        self.fused_optimizer = args.optimizer != "adamw"
        if self.fused_optimizer:  # LoMo / AdaLomo: each parameter updated in the backward (fastpeft.optim)
            if self.world_size > 1:
                raise ValueError(f"optimizer={args.optimizer!r} runs in one process: its update happens during the "
                                 "backward, before DDP could all-reduce the gradients")
            from ..optim import AdaLomo, LoMo

            cls = LoMo if args.optimizer == "lomo" else AdaLomo
            self.optimizer = cls(self.model, lr=args.learning_rate, clip_grad_norm=args.max_grad_norm or None,
                                 weight_decay=args.weight_decay)
            self.optimizer.remove_hooks()  # attached while train() runs
        else:
            self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=args.betas,
                                               weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, self.warmup_steps, self.total_steps, args.min_lr_ratio))
        self.autocast_dtype = _AUTOCAST[args.mixed_precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if args.mixed_precision == "fp16" else None
        # every rank draws its own dropout masks
        torch.manual_seed(args.seed + 1 + self.rank)
        random.seed(args.seed + 1 + self.rank)

    def _shard(self) -> None:
        """fsdp=True: FSDP2 units per decoder layer and the root (see `.fsdp`); one process: nothing to shard."""
        from . import fsdp

        if self.adapter_names:
            raise NotImplementedError("fsdp=True with several adapters (a dict of datasets) is not implemented; "
                                      "train them with DDP (fsdp=False)")

        if self.model.is_prompt_learning:
            raise ValueError(f"fsdp=True shards LoRA and IA3 models; {self.model.peft_type.value} keeps its "
                             f"parameters outside the decoder layers, train it with DDP (fsdp=False)")
        if self.world_size == 1:
            self._log("fsdp: one process, nothing to shard; training unsharded")
            return
        param_dtype = fsdp.mixed_precision_dtype(self.model, _AUTOCAST[self.args.mixed_precision])
        layers = fsdp.shard_model(self.model, self.device, param_dtype, self.args.fsdp_cpu_offload)
        self.fsdp = True
        sizes = fsdp.parameter_bytes(self.model)
        self._log(f"fsdp: {len(layers)} decoder layers + root sharded over {self.world_size} ranks | frozen "
                  f"{fmt_bytes(sizes['frozen_local'])} of {fmt_bytes(sizes['frozen_total'])} on this rank | "
                  f"gathered in {param_dtype or torch.float32}, gradients reduced in fp32"
                  + (" | shards offloaded to CPU" if self.args.fsdp_cpu_offload else ""))

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of parameters on this rank: frozen / trainable, local and total (local < total under fsdp)."""
        from .fsdp import parameter_bytes

        return parameter_bytes(self.model)

    def close(self) -> None:
        """Destroy the process group this trainer opened (all ranks call it; also done at exit)."""
        shutdown_distributed(barrier=True)

    # ------------------------------------------------------------------ helpers
    def _check_vocab(self) -> None:
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if emb is None:
            return
        vocab = emb.weight.shape[0]
        top = max(max(e.input_ids) for e in self.train_examples + self.eval_examples)
        if top >= vocab or self.pad_id >= vocab:
            raise ValueError(f"token id {max(top, self.pad_id)} is outside the model's vocabulary of {vocab}; "
                             f"was the data tokenised with another model's tokenizer?")

    def _log(self, msg: str) -> None:
        if self.rank == 0 and self.args.progress:
            print(msg, file=sys.stderr, flush=True)

    def _warn(self, msg: str) -> None:
        """Printed on rank 0 even when progress is off."""
        if self.rank == 0:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def _step_indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_examples), self.args.seed, epoch)
        return order[pos * self.global_batch:(pos + 1) * self.global_batch]

    def _forward_loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ of token cross-entropies of the batch (the model returns their mean)."""
        n = int((batch["labels"][:, 1:] != -100).sum())
        batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = model(**batch)
        if n == 0:
            return out.logits.float().sum() * 0.0
        return out.loss.float() * n

    def _fused_step(self, model: nn.Module, batch: dict[str, Any], n_targets: int, step_loss: torch.Tensor) -> None:
        """One LoMo / AdaLomo step on one micro-batch: the loss checked before anything changes, the norm pass
        when clipping, then the update pass at the scheduler's learning rate."""
        loss = self._forward_loss_sum(model, batch) / n_targets
        step_loss += loss.detach()
        value = float(loss.detach())
        if not math.isfinite(value):
            self._non_finite(f"the loss is {value}", self.global_step + 1)
        opt = self.optimizer
        if opt.clip_grad_norm is not None:
            norm = float(opt.grad_norm(loss))
            if not math.isfinite(norm):
                self._non_finite(f"the gradient norm is {norm}", self.global_step + 1)
        opt.fused_backward(loss, opt.param_groups[0]["lr"])

    # ------------------------------------------------------------------ state
    def _check_finite_weights(self, what: str, step: int) -> None:
        params = _trainable(self.model)
        if self.fsdp:  # every rank checks its shards and they agree
            from .fsdp import all_finite

            bad = all_finite(params)
        else:
            bad = next((n for n, p in params.items() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            self._non_finite(f"the adapter weight {bad} is not finite", step, f"the {what} was not written")

    def _non_finite(self, what: str, step: int, saved: str = "the step was not applied") -> None:
        last = self._last_good_checkpoint()
        keep = (f"the last good checkpoint is {last} (continue from it with --resume / resume='latest', perhaps "
                f"with a lower learning rate)" if last else "no checkpoint was written before it (save_every "
                "keeps some)")
        raise NonFiniteLossError(f"training stopped at step {step}: {what}; {saved}, nothing non-finite was "
                                 f"saved; {keep}", step, last)

    def _maybe_preempted(self, guard: PreemptionGuard) -> None:
        """After a complete step: if a stop signal came (on any rank), checkpoint and raise TrainingPreempted."""
        signum = guard.signum or 0
        d = _dist()
        if d:  # every rank stops at the same step
            flag = torch.tensor([signum], device=self.device if self.device.type == "cuda" else "cpu")
            d.all_reduce(flag, op=d.ReduceOp.MAX)
            signum = int(flag.item())
        if not signum:
            return
        checkpoint = None
        if self.args.output_dir:
            if self._saved_step == self.global_step:
                checkpoint = os.path.join(self.args.output_dir, f"{CHECKPOINT_PREFIX}{self.global_step:06d}")
            else:
                checkpoint = self.save_checkpoint()
        raise TrainingPreempted(signum, self.global_step, self.total_steps, checkpoint)

    def _last_good_checkpoint(self) -> str | None:
        return find_checkpoint(self.args.output_dir) if self.args.output_dir else None

    def _checkpoint_bytes(self) -> int:
        """Planned size of one checkpoint: adapter file + trainable copy + two Adam moments (fp32) + slack."""
        return 4 * sum(p.numel() * 4 for p in _trainable(self.model).values()) + 64 * 1024

    def _agree(self, ok: bool) -> bool:
        """All ranks learn whether rank 0's write succeeded (so none waits at a barrier for a dead writer)."""
        d = _dist()
        if not d:
            return ok
        flag = torch.tensor([1 if ok else 0], device=self.device if self.device.type == "cuda" else "cpu")
        d.all_reduce(flag, op=d.ReduceOp.MIN)
        return bool(flag.item())

    def _adapter_saver(self) -> Callable[[str], None]:
        """`save(folder)` writing the adapter in PEFT format (rank 0 calls it).  Under fsdp every rank
        must call this first: it gathers the adapter tensors (only those) in full."""
        if not self.fsdp:
            return self.model.save_pretrained
        from .fsdp import gather_adapter, gathered_state

        full = gather_adapter(self.model)

        def save(folder: str) -> None:
            with gathered_state(self.model, full):
                self.model.save_pretrained(folder)
        return save

    def save_checkpoint(self, path: str | None = None) -> str | None:
        """Write the adapter (PEFT format) and trainer state to `path` (default output_dir/checkpoint-STEP)
        as a set (see `fastpeft.training.checkpoints`); `CheckpointWriteError` when the disk is full or the
        folder not writable (the partial folder is removed, earlier checkpoints stay intact)."""
        args = self.args
        rng = [pack_rng(self.device)]
        d = _dist()
        if d:
            gathered: list[Any] = [None] * self.world_size
            d.all_gather_object(gathered, rng[0])
            rng = gathered
        if path is None:
            if not args.output_dir:
                return None
            path = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{self.global_step:06d}")
        self._check_finite_weights(f"checkpoint {path}", self.global_step)
        if self.fsdp:
            return self._save_sharded_checkpoint(path, rng)
        failure: BaseException | None = None
        if self.rank == 0:
            state = {
                "format": 2,  # plain data only: tensors, numbers, strings, lists, dicts (weights_only=True)
                "step": self.global_step,
                "trainable": {n: p.detach().cpu().clone() for n, p in _trainable(self.model).items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng,
                "world_size": self.world_size,
                "args": json.loads(json.dumps(asdict(args))),
            }
            data = serialize(state)
            info = self._checkpoint_info()
            needed = len(data) + self._checkpoint_bytes() // 4 + 16 * 1024
            try:
                write_checkpoint(path, self.model.save_pretrained, data, info, needed)
                self._prune_checkpoints()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks know
                failure = err
        if not self._agree(failure is None):
            if failure is not None:
                raise failure
            raise RuntimeError(f"rank 0 could not write checkpoint {path}; stopping")
        self._saved_step = self.global_step
        return path

    def _checkpoint_info(self) -> dict[str, Any]:
        return {"step": self.global_step, "total_steps": self.total_steps,
                "epoch": self.global_step / self.steps_per_epoch,
                "examples_seen": self.global_step * self.global_batch, "global_batch": self.global_batch,
                "world_size": self.world_size, "history": self.history[-50:]}

    def _save_sharded_checkpoint(self, path: str, rng: list[Any]) -> str:
        """fsdp: rank 0 opens `path.tmp`; every rank writes its shards of the adapter and the optimizer
        into it (`torch.distributed.checkpoint`); rank 0 adds the gathered adapter (PEFT format) and the
        trainer state and renames the folder: a rank killed at any point leaves no `path` (or the old one)."""
        from .checkpoints import discard_staging, prepare_staging, staging_path
        from .fsdp import full_tensors, save_sharded

        save_adapter = self._adapter_saver()
        trainable = full_tensors(_trainable(self.model))
        failure: BaseException | None = None
        if self.rank == 0:
            try:
                prepare_staging(path)
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks know
                failure = write_error(err, "checkpoint", path, self._checkpoint_bytes()) or err
        if not self._agree(failure is None):
            if failure is not None:
                raise failure
            raise RuntimeError(f"rank 0 could not create {staging_path(path)}; stopping")
        plain: dict[str, Any] = {}
        try:
            plain = save_sharded(staging_path(path), self.model, self.optimizer)
        except BaseException as err:  # noqa: BLE001 - every rank learns of it below
            failure = write_error(err, "checkpoint shards into", path, self._checkpoint_bytes()) or err
        if self.rank == 0 and failure is None:
            state = {
                "format": 2,
                "step": self.global_step,
                "trainable": trainable,
                "optimizer": plain,          # param groups; the tensors are the per-rank shards (sharded/)
                "fsdp": True,
                "scheduler": self.scheduler.state_dict(),
                "scaler": None,
                "rng": rng,
                "world_size": self.world_size,
                "args": json.loads(json.dumps(asdict(self.args))),
            }
            data = serialize(state)
            needed = len(data) + self._checkpoint_bytes() // 4 + 16 * 1024
            try:
                write_checkpoint(path, save_adapter, data, self._checkpoint_info(), needed, staged=True)
                self._prune_checkpoints()
            except BaseException as err:  # noqa: BLE001
                failure = err
        if not self._agree(failure is None):
            if self.rank == 0:
                discard_staging(path)
            if failure is not None:
                raise failure
            raise RuntimeError(f"another rank could not write its part of checkpoint {path}; stopping")
        self._saved_step = self.global_step
        return path

    def _prune_checkpoints(self) -> None:
        keep = self.args.keep_checkpoints
        if not keep or not self.args.output_dir:
            return
        for path in list_checkpoints(self.args.output_dir)[keep:]:
            shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Restore adapter, optimizer, scheduler, scaler, step and this rank's RNG from `path`.
        `CheckpointError` if the checkpoint is unreadable or holds anything but plain data (nothing is
        unpickled beyond tensors and numbers); `ValueError` if it was written for another adapter."""
        self._apply_state(read_state(path), path)

    def _apply_state(self, state: dict[str, Any], path: str) -> None:
        params = _trainable(self.model)
        saved = state["trainable"]
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]} (another method, rank or target modules?)")
        for name, p in params.items():
            if p.shape != saved[name].shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, the model "
                                 f"expects {tuple(p.shape)}")
        sharded = bool(state.get("fsdp"))
        if sharded != self.fsdp:
            raise ValueError(f"checkpoint {path} was written {'with' if sharded else 'without'} FSDP; resume it "
                             f"{'with' if sharded else 'without'} fsdp (and the same number of processes)")
        if sharded:
            if state.get("world_size") != self.world_size:
                raise ValueError(f"checkpoint {path} holds the shards of {state.get('world_size')} ranks; resume "
                                 f"it with that many processes, not {self.world_size}")
            from .fsdp import load_sharded

            try:
                self.scheduler.load_state_dict(state["scheduler"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"checkpoint {path}: the scheduler state does not fit ({err})") from None
            load_sharded(path, self.model, self.optimizer, state["optimizer"])  # adapter shards too
        else:
            try:  # both validate before they change anything
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"checkpoint {path}: the optimizer state does not fit this model ({err})") from None
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["step"])
        self._saved_step = self.global_step
        old = state.get("args") or {}
        for key in ("batch_size", "grad_accum", "seed", "max_seq_len"):
            if key in old and old[key] != getattr(self.args, key):
                self._log(f"warning: resuming with {key}={getattr(self.args, key)} but the checkpoint used "
                          f"{old[key]}; the data order will differ from an uninterrupted run")
        rng = state["rng"]
        if state.get("world_size", 1) == self.world_size and len(rng) > self.rank:
            unpack_rng(rng[self.rank], self.device)
        else:
            self._log(f"warning: checkpoint was written by {state.get('world_size')} process(es), now "
                      f"{self.world_size}; RNG streams are re-seeded")
        self._log(f"resumed from {path} at step {self.global_step}/{self.total_steps}")

    def _resume(self) -> None:
        """`resume='latest'`: the newest intact checkpoint; a truncated or corrupt newer one is moved aside
        (to NAME.corrupt) with a warning and the previous one is used."""
        args = self.args
        if args.resume != "latest":
            self.load_checkpoint(args.resume)
            return
        candidates = list_checkpoints(args.output_dir)
        if not candidates:
            self._log(f"no checkpoint in {args.output_dir}; starting from step 0")
            return
        for i, path in enumerate(candidates):
            try:
                state = read_state(path)
            except CheckpointError as err:
                nxt = candidates[i + 1] if i + 1 < len(candidates) else None
                self._warn(f"{err}; " + (f"falling back to {nxt}" if nxt else "no older checkpoint is left"))
                if self.rank == 0:
                    with contextlib.suppress(OSError):
                        shutil.rmtree(path + ".corrupt", ignore_errors=True)
                        os.replace(path, path + ".corrupt")
                continue
            self._apply_state(state, path)
            return
        raise CheckpointError(f"no intact checkpoint in {args.output_dir} to resume from (see the warnings "
                              f"above); start a new run with another --out, or --overwrite")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the eval data (split across processes)."""
        if not self.eval_examples:
            return None
        model = self.model
        was_training = model.training
        model.eval()
        mine = self.eval_examples[self.rank::self.world_size]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        bs = self.args.batch_size
        batches = -(-len(mine) // bs)
        if self.fsdp:  # every forward all-gathers: all ranks run as many as the rank with the most batches
            batches = -(-(-(-len(self.eval_examples) // self.world_size)) // bs)
        for i in range(batches):
            chunk = mine[i * bs:(i + 1) * bs]
            if not chunk:  # this rank's share ran out: a forward that counts for nothing
                self._forward_loss_sum(model, collate(self.eval_examples[:1], self.pad_id))
                continue
            total[0] += self._forward_loss_sum(model, collate(chunk, self.pad_id)).double()
            total[1] += sum(e.num_targets for e in chunk)
        d = _dist()
        if d:
            d.all_reduce(total)
        model.train(was_training)
        return (total[0] / total[1].clamp_min(1)).item()

    # ------------------------------------------------------------------ training
    def train(self) -> TrainResult:
        """Run to `total_steps`.  With an output_dir, rank 0 first checks the folder is writable and takes
        its run lock (`RunLockedError` if another live run holds it).  SIGTERM / SIGINT / SIGUSR1 end the
        run after the current step with a checkpoint and `TrainingPreempted` (see `.preemption`); a
        non-finite loss, gradient norm or adapter weight raises `NonFiniteLossError` without saving it; a
        write that fails for space or permission raises `CheckpointWriteError`."""
        args = self.args
        lock = None
        if args.output_dir and self.rank == 0:
            check_writable(args.output_dir)
            lock = acquire_run_lock(args.output_dir, self._warn)
        _CLEAN_END.clear()
        try:
            with PreemptionGuard(announce=self.rank == 0) as guard:
                result = self._train(guard)
            _CLEAN_END.append(True)  # every rank got here: at exit they wait for each other, then close
            return result
        except TrainingPreempted:  # all ranks stop at the same step, so they meet at exit too
            _CLEAN_END.append(True)
            raise
        finally:
            release_run_lock(lock)

    def _train(self, guard: PreemptionGuard) -> TrainResult:
        if self.fused_optimizer:  # LoMo's hooks live only while this trainer trains: a later backward is plain
            self.optimizer.attach()
            try:
                return self._train_loop(guard)
            finally:
                self.optimizer.remove_hooks()
        return self._train_loop(guard)

    def _train_loop(self, guard: PreemptionGuard) -> TrainResult:
        args = self.args
        if args.resume:
            self._resume()
        if args.output_dir and self.rank == 0:
            need, free = 2 * self._checkpoint_bytes(), free_bytes(args.output_dir)
            if free is not None and free < need:
                self._warn(f"{args.output_dir} has {fmt_bytes(free)} free, less than two checkpoints need "
                           f"({fmt_bytes(need)}); writing one may fail")
        d = _dist()
        model: nn.Module = self.model
        if d and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            ids = None
            if self.device.type == "cuda":
                ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            model = DistributedDataParallel(self.model, device_ids=ids)
        base = self.model.get_base_model()
        config = getattr(base, "config", None)
        use_cache = getattr(config, "use_cache", None)
        if config is not None and use_cache is not None:
            config.use_cache = False
        if args.gradient_checkpointing:
            _checkpointing(base, True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        model.train()
        self._log(f"training {self.model.peft_type.value} | trainable params {self.trainable_params:,d} | "
                  f"{len(self.train_examples)} examples | global batch {self.global_batch} | "
                  f"{self.total_steps} steps | {self.world_size} process(es) on {self.device.type}")

        start_time = time.perf_counter()
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, start_time
        total_tokens = 0
        train_loss = eval_loss = None
        is_tty = sys.stderr.isatty()
        first_step = self.global_step
        try:
            while self.global_step < self.total_steps and not self.stop:
                indices = self._step_indices(self.global_step)
                examples = [self.train_examples[i] for i in indices]
                n_targets = sum(e.num_targets for e in examples)
                step_tokens = sum(len(e.input_ids) for e in examples)
                step_loss = torch.zeros((), dtype=torch.float32, device=self.device)
                bs = args.batch_size
                for k in range(args.grad_accum):
                    slot = k * self.world_size + self.rank
                    lo = slot * bs
                    batch = collate(examples[lo:lo + bs], self.pad_id)
                    last = k == args.grad_accum - 1
                    # the dropout masks of this micro-batch, whichever process runs it (see the module doc)
                    torch.manual_seed(_micro_batch_seed(args.seed, self.global_step, slot))
                    if self.fsdp:
                        from .fsdp import set_gradient_sync

                        set_gradient_sync(model, last)
                        ctx = contextlib.nullcontext()
                    else:
                        ctx = model.no_sync() if d and not last else contextlib.nullcontext()
                    if self.fused_optimizer:  # LoMo / AdaLomo: the step happens in these backward passes
                        self._fused_step(model, batch, n_targets, step_loss)
                        continue
                    with ctx:
                        loss = self._forward_loss_sum(model, batch) / n_targets
                        step_loss += loss.detach()
                        # DDP and FSDP average gradients over processes; undo that so they sum like one batch
                        scaled = loss * self.world_size
                        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                if d:  # each process holds its share of the global mean
                    d.all_reduce(step_loss)
                loss_value = float(step_loss)
                if not math.isfinite(loss_value):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._non_finite(f"the loss is {loss_value}", self.global_step + 1)
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                if args.max_grad_norm and not self.fused_optimizer:
                    params = list(_trainable(self.model).values())
                    if self.fsdp:
                        from .fsdp import clip_grad_norm

                        norm = clip_grad_norm(params, args.max_grad_norm)
                    else:
                        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    if self.scaler is None and not math.isfinite(float(norm)):  # the scaler skips such steps
                        self.optimizer.zero_grad(set_to_none=True)
                        self._non_finite(f"the gradient norm is {float(norm)}", self.global_step + 1)
                lr = self.optimizer.param_groups[0]["lr"]
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                total_tokens += step_tokens
                window_tokens += step_tokens
                window_steps += 1
                window_loss += loss_value

                logs: dict[str, float] = {"step": self.global_step, "lr": lr}
                done = self.global_step >= self.total_steps
                if self.global_step % args.log_every == 0 or done:
                    now = time.perf_counter()
                    train_loss = window_loss / window_steps
                    rate = window_tokens / max(now - window_start, 1e-9)
                    logs.update(loss=train_loss, tokens_per_s=rate)
                    self.history.append(dict(logs))
                    elapsed = now - start_time
                    done_here = self.global_step - first_step
                    eta = elapsed / max(done_here, 1) * (self.total_steps - self.global_step)
                    line = (f"step {self.global_step}/{self.total_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                            f"{rate:,.0f} tok/s | {_fmt_time(elapsed)}<{_fmt_time(eta)}")
                    if self.rank == 0 and args.progress:
                        if is_tty:
                            print("\r" + _bar(self.global_step, self.total_steps) + " " + line,
                                  end="\n" if done else "", file=sys.stderr, flush=True)
                        else:
                            print(line, file=sys.stderr, flush=True)
                    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, now
                if self.eval_examples and ((args.eval_every and self.global_step % args.eval_every == 0) or done):
                    eval_loss = self.evaluate()
                    logs["eval_loss"] = eval_loss
                    self.history.append({"step": self.global_step, "eval_loss": eval_loss})
                    if self.rank == 0 and args.progress:
                        print(("\n" if is_tty and not done else "") + f"step {self.global_step}: eval loss "
                              f"{eval_loss:.4f}", file=sys.stderr, flush=True)
                if args.save_every and self.global_step % args.save_every == 0 and args.output_dir:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb(self, logs)
                if not done:
                    self._maybe_preempted(guard)
        finally:
            if args.gradient_checkpointing:
                _checkpointing(base, False)
            if config is not None and use_cache is not None:
                config.use_cache = use_cache
        seconds = time.perf_counter() - start_time
        if args.output_dir:
            if args.save_every and self.global_step % args.save_every != 0:
                self.save_checkpoint()
            self._check_finite_weights("final adapter", self.global_step)
            save_adapter = self._adapter_saver()
            failure: BaseException | None = None
            if self.rank == 0:
                summary = {"step": self.global_step, "total_steps": self.total_steps, "train_loss": train_loss,
                           "eval_loss": eval_loss, "history": self.history}
                try:
                    save_adapter(args.output_dir)
                    _write_json(os.path.join(args.output_dir, STATE_JSON), summary)
                except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks know
                    failure = write_error(err, "the adapter into", args.output_dir, self._checkpoint_bytes() // 4) \
                        or err
            if not self._agree(failure is None):
                if failure is not None:
                    raise failure
                raise RuntimeError(f"rank 0 could not write the adapter into {args.output_dir}; stopping")
        peak = _peak_memory(self.device)
        result = TrainResult(self.global_step, train_loss, eval_loss, seconds, total_tokens, self.trainable_params,
                             peak, list(self.history))
        what = "peak GPU memory" if self.device.type == "cuda" else "peak process RSS"
        self._log(f"done: {self.global_step - first_step} steps in {_fmt_time(seconds)} | trainable params "
                  f"{self.trainable_params:,d} | {total_tokens:,d} tokens | "
                  + (f"final loss {train_loss:.4f} | " if train_loss is not None else "")
                  + (f"eval loss {eval_loss:.4f} | " if eval_loss is not None else "")
                  + f"{what} {fmt_bytes(peak)}"
                  + (f" | adapter saved to {args.output_dir}" if args.output_dir and not self.adapter_names else "")
                  + (f" | adapters saved to {', '.join(os.path.join(args.output_dir, n) for n in self.adapter_names)}"
                     if args.output_dir and self.adapter_names else ""))
        return result


def _adapter_datasets(train_dataset: Any, eval_dataset: Any) -> list[str]:
    """The adapter names of a multi-adapter run (`train_dataset` a dict {name: data}), else []; checks that
    the eval data, if any, is a dict with the same names."""
    if not isinstance(train_dataset, dict):
        if isinstance(eval_dataset, dict):
            raise ValueError("eval_dataset is a dict of adapters' data but train_dataset is not; pass both as dicts "
                             "{adapter name: data} to train several adapters")
        return []
    from ..peft_model import check_adapter_name

    names = list(train_dataset)
    if not names:
        raise ValueError("train_dataset is an empty dict; give {adapter name: data} for each adapter to train")
    for name in names:
        check_adapter_name(name)
        if name in ("default", "__base__"):
            raise ValueError(f"adapter name {name!r} is reserved; name each adapter after its data")
    if eval_dataset is not None:
        if not isinstance(eval_dataset, dict) or set(eval_dataset) != set(names):
            got = sorted(eval_dataset) if isinstance(eval_dataset, dict) else type(eval_dataset).__name__
            raise ValueError(f"with one adapter per dataset, eval_dataset must be a dict with the same adapter names "
                             f"{sorted(names)}, got {got}")
    return names


def _train_adapters(model: PeftModel, names: list[str]) -> None:
    """Make the adapters `names` (LoRA: mixed-adapter batches route each row to its adapter) all trainable."""
    if model.peft_type != PeftType.LORA:
        raise ValueError(f"training several adapters in one run (a dict of datasets) needs LoRA, whose mixed-adapter "
                         f"batches route each example to its adapter; this model is {model.peft_type.value}")
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise ValueError(f"the model has no adapter(s) {missing} for the datasets of that name; it holds "
                         f"{sorted(model.peft_config)}")
    from ..nn._base import AdapterLayer

    model.set_adapter(names[0])  # the PeftModel's bookkeeping; the layers then train every named adapter
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            held = [n for n in names if n in getattr(module, module.adapter_layer_names[0])]
            if held:
                module.set_adapter(held)


def _tagged(examples: list[Example], name: str) -> list[Example]:
    return [dataclasses.replace(e, adapter=name) for e in examples]


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _checkpointing(model: nn.Module, on: bool) -> None:
    # transformers >= 5.2x renamed gradient_checkpointing_* to activation_checkpointing_*
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    if not hasattr(model, f"{name}_enable"):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    if on:
        getattr(model, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{name}_disable")()


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def train(model: nn.Module, config: PeftConfig | None = None, dataset: Any = None, *, eval_dataset: Any = None,
          tokenizer: Any = None, args: TrainArgs | None = None,
          callbacks: list[Callable[[Trainer, dict], None]] | None = None, **kwargs: Any) -> PeftModel:
    """Fine-tune `model` with the adapter `config` on `dataset` (JSONL path or records); returns the
    PeftModel.  Keyword options are TrainArgs fields (`max_steps=100, learning_rate=1e-3, ...`)."""
    if args is not None and kwargs:
        raise ValueError("pass either args=TrainArgs(...) or TrainArgs fields as keywords, not both")
    if args is None:
        known = set(TrainArgs.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown training option(s) {unknown}; options are the fields of TrainArgs")
        args = TrainArgs(**kwargs)
    trainer = Trainer(model, args, dataset, eval_dataset=eval_dataset, peft_config=config, tokenizer=tokenizer,
                      callbacks=callbacks)
    trainer.result = trainer.train()
    trainer.model.train_result = trainer.result
    return trainer.model
