"""Causal-LM fine-tuning of a PeftModel with any method (LoRA, IA3, prefix, prompt, P-tuning).

One optimizer step consumes a global batch of `batch_size × grad_accum × world_size` examples taken
in a seeded per-epoch order (partial global batches at an epoch's end are dropped).  The loss of a
step is the mean over every target token of the global batch:

    loss = Σ_tokens CE / N_targets(global batch)

so gradient accumulation and data parallelism give the same update as one big batch.  AdamW with a
linear warm-up then cosine decay; gradients clipped by global norm; bf16/fp16 autocast (fp16 with a
GradScaler); trainable parameters kept in fp32.  Checkpoints hold the adapter in PEFT format
(`save_pretrained`) plus `trainer_state.pt` (trainable tensors, optimizer, scheduler, scaler, step,
RNG states of every rank), so a resumed run continues the schedule, data order and dropout stream
exactly (given the same options; a longer --steps on resume stretches the cosine from there on).

Past one GPU: under `torchrun` (WORLD_SIZE > 1) the process group is initialised (nccl on CUDA, gloo
on CPU), the PeftModel is wrapped in DistributedDataParallel, which all-reduces only the adapter
gradients (frozen base weights take no part), and each rank reads its share of every global batch;
only rank 0 prints and writes; every rank's RNG state goes into the checkpoint.  FSDP2
(`torch.distributed.fsdp.fully_shard`) is not wired into this trainer: a frozen base model that fits
one GPU is replicated, which is what DDP does; sharding a base too big for one GPU needs the adapter
tensors gathered (DTensor.full_tensor) before `save_pretrained`, which this trainer does not do yet.
"""

from __future__ import annotations

import contextlib
import json
import math
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
from .data import Example, collate, epoch_order, load_examples, split_eval
from .tokenizer import ByteTokenizer

STATE_NAME = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
_AUTOCAST = {"no": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    warmup_steps: int | None = None        # None: warmup_ratio × total steps
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0              # cosine decays to learning_rate × min_lr_ratio
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"            # "no" | "bf16" | "fp16" (autocast)
    gradient_checkpointing: bool = False   # not with prefix tuning
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
        for name in ("batch_size", "grad_accum", "epochs", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.betas = tuple(self.betas)


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


def _init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
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


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# ---------------------------------------------------------------------------- checkpoints
def find_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint folder under `output_dir`, or None."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    best, best_step = None, -1
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(CHECKPOINT_PREFIX) and os.path.isfile(os.path.join(path, STATE_NAME)):
            try:
                step = int(name[len(CHECKPOINT_PREFIX):])
            except ValueError:
                continue
            if step > best_step:
                best, best_step = path, step
    return best


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


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


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
        self.stop = False  # a callback may set this to end training after the current step

        # the same seed on every rank: identical adapter initialisation
        torch.manual_seed(args.seed)
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError("model is already a PeftModel; do not pass peft_config too")
            self.model = model
        else:
            if peft_config is None:
                raise ValueError("pass a PeftModel, or a base model together with peft_config")
            self.model = get_peft_model(model, peft_config)
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

        self.pad_id = self._pad_id()
        self.train_examples: list[Example] = load_examples(train_dataset, self.tokenizer, args.max_seq_len,
                                                           "train data")
        if eval_dataset is not None:
            self.eval_examples = load_examples(eval_dataset, self.tokenizer, args.max_seq_len, "eval data")
        elif args.eval_fraction:
            self.train_examples, self.eval_examples = split_eval(self.train_examples, args.eval_fraction, args.seed)
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
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=args.betas,
                                           weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, self.warmup_steps, self.total_steps, args.min_lr_ratio))
        self.autocast_dtype = _AUTOCAST[args.mixed_precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if args.mixed_precision == "fp16" else None
        # every rank draws its own dropout masks
        torch.manual_seed(args.seed + 1 + self.rank)
        random.seed(args.seed + 1 + self.rank)

    # ------------------------------------------------------------------ helpers
    def _pad_id(self) -> int:
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None)
            if value is not None:
                return int(value)
        return 0

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

    def _step_indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_examples), self.args.seed, epoch)
        return order[pos * self.global_batch:(pos + 1) * self.global_batch]

    def _forward_loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ of token cross-entropies of the batch (the model returns their mean)."""
        n = int((batch["labels"][:, 1:] != -100).sum())
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = model(**batch)
        if n == 0:
            return out.logits.float().sum() * 0.0
        return out.loss.float() * n

    # ------------------------------------------------------------------ state
    def save_checkpoint(self, path: str | None = None) -> str | None:
        """Write the adapter (PEFT format) and trainer state to `path` (default output_dir/checkpoint-STEP)."""
        args = self.args
        rng = [_rng_state(self.device)]
        d = _dist()
        if d:
            gathered: list[Any] = [None] * self.world_size
            d.all_gather_object(gathered, rng[0])
            rng = gathered
        if path is None:
            if not args.output_dir:
                return None
            path = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{self.global_step:06d}")
        if self.rank == 0:
            tmp = path.rstrip("/") + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp)
            state = {
                "step": self.global_step,
                "trainable": {n: p.detach().cpu().clone() for n, p in _trainable(self.model).items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng,
                "world_size": self.world_size,
                "args": asdict(args),
            }
            torch.save(state, os.path.join(tmp, STATE_NAME))
            info = {"step": self.global_step, "total_steps": self.total_steps,
                    "epoch": self.global_step / self.steps_per_epoch,
                    "examples_seen": self.global_step * self.global_batch, "global_batch": self.global_batch,
                    "world_size": self.world_size, "history": self.history[-50:]}
            with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as fh:
                json.dump(info, fh, indent=2)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            self._prune_checkpoints()
        if d:
            d.barrier()
        return path

    def _prune_checkpoints(self) -> None:
        keep = self.args.keep_checkpoints
        if not keep or not self.args.output_dir:
            return
        names = sorted(n for n in os.listdir(self.args.output_dir)
                       if n.startswith(CHECKPOINT_PREFIX) and not n.endswith(".tmp"))
        for name in names[:-keep]:
            shutil.rmtree(os.path.join(self.args.output_dir, name), ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Restore adapter, optimizer, scheduler, scaler, step and this rank's RNG from `path`."""
        file = os.path.join(path, STATE_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path} is not a fastpeft checkpoint (no {STATE_NAME})")
        state = torch.load(file, map_location="cpu", weights_only=False)
        params = _trainable(self.model)
        saved = state["trainable"]
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]} (another method, rank or target modules?)")
        with torch.no_grad():
            for name, p in params.items():
                if p.shape != saved[name].shape:
                    raise ValueError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, the model "
                                     f"expects {tuple(p.shape)}")
                p.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["step"])
        old = state.get("args", {})
        for key in ("batch_size", "grad_accum", "seed", "max_seq_len"):
            if key in old and old[key] != getattr(self.args, key):
                self._log(f"warning: resuming with {key}={getattr(self.args, key)} but the checkpoint used "
                          f"{old[key]}; the data order will differ from an uninterrupted run")
        if state.get("world_size", 1) == self.world_size:
            _set_rng_state(state["rng"][self.rank], self.device)
        else:
            self._log(f"warning: checkpoint was written by {state.get('world_size')} process(es), now "
                      f"{self.world_size}; RNG streams are re-seeded")
        self._log(f"resumed from {path} at step {self.global_step}/{self.total_steps}")

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
        for i in range(0, len(mine), bs):
            chunk = mine[i:i + bs]
            total[0] += self._forward_loss_sum(model, collate(chunk, self.pad_id)).double()
            total[1] += sum(e.num_targets for e in chunk)
        d = _dist()
        if d:
            d.all_reduce(total)
        model.train(was_training)
        return (total[0] / total[1].clamp_min(1)).item()

    # ------------------------------------------------------------------ training
    def train(self) -> TrainResult:
        args = self.args
        if args.resume:
            path = find_checkpoint(args.output_dir) if args.resume == "latest" else args.resume
            if path is None:
                self._log(f"no checkpoint in {args.output_dir}; starting from step 0")
            else:
                self.load_checkpoint(path)
        d = _dist()
        model: nn.Module = self.model
        if d:
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
                    lo = (k * self.world_size + self.rank) * bs
                    batch = collate(examples[lo:lo + bs], self.pad_id)
                    last = k == args.grad_accum - 1
                    ctx = model.no_sync() if d and not last else contextlib.nullcontext()
                    with ctx:
                        loss = self._forward_loss_sum(model, batch) / n_targets
                        step_loss += loss.detach()
                        # DDP averages gradients over processes; undo that so they sum like one big batch
                        scaled = loss * self.world_size
                        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                if args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(list(_trainable(self.model).values()), args.max_grad_norm)
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
                if d:  # each process holds its share of the global mean
                    d.all_reduce(step_loss)
                window_loss += float(step_loss)

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
        finally:
            if args.gradient_checkpointing:
                _checkpointing(base, False)
            if config is not None and use_cache is not None:
                config.use_cache = use_cache
        seconds = time.perf_counter() - start_time
        if args.output_dir:
            if args.save_every and self.global_step % args.save_every != 0:
                self.save_checkpoint()
            if self.rank == 0:
                self.model.save_pretrained(args.output_dir)
                with open(os.path.join(args.output_dir, STATE_JSON), "w", encoding="utf-8") as fh:
                    json.dump({"step": self.global_step, "total_steps": self.total_steps, "train_loss": train_loss,
                               "eval_loss": eval_loss, "history": self.history}, fh, indent=2)
            if d:
                d.barrier()
        peak = _peak_memory(self.device)
        result = TrainResult(self.global_step, train_loss, eval_loss, seconds, total_tokens, self.trainable_params,
                             peak, list(self.history))
        what = "peak GPU memory" if self.device.type == "cuda" else "peak process RSS"
        self._log(f"done: {self.global_step - first_step} steps in {_fmt_time(seconds)} | trainable params "
                  f"{self.trainable_params:,d} | {total_tokens:,d} tokens | "
                  + (f"final loss {train_loss:.4f} | " if train_loss is not None else "")
                  + (f"eval loss {eval_loss:.4f} | " if eval_loss is not None else "")
                  + f"{what} {_fmt_bytes(peak)}"
                  + (f" | adapter saved to {args.output_dir}" if args.output_dir else ""))
        return result


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
