"""Adapter files: atomic writes and safetensors reads that name the file when anything is wrong."""

from __future__ import annotations

import os
import tempfile

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def _atomic(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    _atomic(path, write)


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file + rename); tied or strided tensors are copied."""
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (tied weights, views)
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(plain, tmp, metadata=metadata or {"format": "pt"}))


def load_tensors(directory: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read adapter weights from `directory`, with an error naming the file if missing or corrupt."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"adapter weights file {path} is corrupt or truncated: {err}") from None
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            raise ValueError(f"adapter weights file {legacy} is corrupt or truncated: {err}") from None
    raise FileNotFoundError(f"no adapter weights in {directory}: expected {WEIGHTS_NAME}")
