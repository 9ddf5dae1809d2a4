"""Training API: `train(model, config, dataset, ...)` / `Trainer`, the byte tokenizer, model presets,
and the `fastpeft train` / `fastpeft generate` commands (`fastpeft.training.cli`)."""

from .checkpoints import CheckpointError, CheckpointWriteError
from .data import DEFAULT_DATA, DataError, Example, load_examples, read_jsonl
from .models import PRESETS, build_preset, load_model, preset_config
from .preemption import TrainingPreempted
from .runlock import RunLockedError
from .tokenizer import ByteTokenizer
from .trainer import NonFiniteLossError, TrainArgs, Trainer, TrainResult, find_checkpoint, train

__all__ = ["train", "Trainer", "TrainArgs", "TrainResult", "ByteTokenizer", "DataError", "Example", "load_examples",
           "read_jsonl", "PRESETS", "build_preset", "load_model", "preset_config", "find_checkpoint", "DEFAULT_DATA",
           "CheckpointError", "CheckpointWriteError", "NonFiniteLossError", "RunLockedError", "TrainingPreempted"]
