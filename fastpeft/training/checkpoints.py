"""Trainer checkpoints: written as a set, read without unpickling code, listed newest first.

A checkpoint is a folder `checkpoint-STEP` holding the adapter in PEFT format plus `trainer_state.pt`:
a `torch.save`d dict of tensors, numbers, strings, None, lists, tuples and dicts only (RNG states as
int64/uint8 tensors), so `torch.load(weights_only=True)` reads it and a file that needs anything else
(a crafted pickle) is refused.  The folder is written as `checkpoint-STEP.tmp`, every file fsync'd, then
renamed: a kill at any point leaves either no `checkpoint-STEP` or a complete one.  A write that fails
(full disk, no permission) removes the `.tmp` folder and raises `CheckpointWriteError` naming the path,
the bytes needed and the bytes free; earlier checkpoints are untouched.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
import tempfile
from typing import Any, Callable

import torch

STATE_NAME = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STATE_KEYS = {"step": int, "trainable": dict, "optimizer": dict, "scheduler": dict, "rng": list}
_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or holding more than plain data."""


class CheckpointWriteError(OSError):
    """A checkpoint or adapter write failed for lack of space or permission (the partial files are removed)."""


# ---------------------------------------------------------------------------- RNG states as tensors
def pack_rng(device: torch.device) -> dict[str, Any]:
    """The RNG states of this process (python, torch, CUDA, numpy) as tensors and numbers."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python_version": int(version), "python": torch.tensor(internal, dtype=torch.int64),
                             "python_gauss": gauss, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    if kind == "MT19937":
        state.update(numpy_keys=torch.from_numpy(keys.astype(np.int64)), numpy_pos=int(pos),
                     numpy_has_gauss=int(has_gauss), numpy_gauss=float(cached))
    return state


def unpack_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy_keys" in state:
        import numpy as np

        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))


# ---------------------------------------------------------------------------- listing and reading
def checkpoint_step(name: str) -> int | None:
    """STEP of a folder named `checkpoint-STEP`, else None (`.tmp` and `.corrupt` folders are not checkpoints)."""
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    digits = name[len(CHECKPOINT_PREFIX):]
    return int(digits) if digits.isdigit() else None


def list_checkpoints(output_dir: str | None) -> list[str]:
    """Checkpoint folders under `output_dir` that hold a trainer state, newest (highest step) first."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = checkpoint_step(name)
        path = os.path.join(output_dir, name)
        if step is not None and os.path.isfile(os.path.join(path, STATE_NAME)):
            found.append((step, path))
    return [path for _, path in sorted(found, reverse=True)]


def read_state(path: str) -> dict[str, Any]:
    """The trainer state of checkpoint folder `path`, read with `weights_only=True`; `CheckpointError`
    when the folder is incomplete, a file is truncated or corrupt, or the state holds anything but plain
    data (no code from the file is ever run)."""
    file = os.path.join(path, STATE_NAME)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} is not a fastpeft checkpoint (no {STATE_NAME})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise
        reason = _reason(err)
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in reason:
            raise CheckpointError(f"{file} holds objects other than tensors and numbers; refusing to unpickle it "
                                  f"(not written by fastpeft, or tampered with): {reason}") from None
        raise CheckpointError(f"{file} is corrupt or truncated: {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} is not a fastpeft trainer state (a {type(state).__name__}, not a dict)")
    for key, kind in _STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{file} is not a fastpeft trainer state: {key!r} is missing or not a "
                                  f"{kind.__name__}")
    bad = [n for n, t in state["trainable"].items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file}: trainable entry {bad[0]!r} is not a tensor")
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.isfile(weights):  # the adapter is what `generate` and PEFT read: it must be intact too
        from safetensors.torch import load_file

        try:
            load_file(weights)
        except Exception as err:  # noqa: BLE001 - any failure to parse means a bad file
            raise CheckpointError(f"{weights} is corrupt or truncated: {err}") from None
    return state


def _reason(err: BaseException) -> str:
    """The informative line of an unpickling error (torch's weights_only errors open with boilerplate)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "unsupported" in line.lower():
            return line
    return lines[0][:300] if lines else type(err).__name__


# ---------------------------------------------------------------------------- writing
def serialize(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` and fsync it (the one place checkpoint bytes reach the disk)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        file = os.path.join(folder, name)
        if os.path.isdir(file):  # the per-rank shards of an FSDP checkpoint
            _fsync_tree(file)
        elif os.path.isfile(file):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync directories
        pass
    finally:
        os.close(fd)


def free_bytes(folder: str) -> int | None:
    probe = folder
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or ".").free
    except OSError:
        return None


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _os_errno(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err)
    if "os error 28" in text or "No space left" in text:  # safetensors' Rust error, torch's inline_container
        return errno.ENOSPC
    if "os error 13" in text or "Permission denied" in text:
        return errno.EACCES
    if "os error 30" in text or "Read-only file system" in text:
        return errno.EROFS
    return None


def write_error(err: BaseException, what: str, path: str, needed: int) -> CheckpointWriteError | None:
    """The one-line error for a failed write of `what` at `path`, or None when `err` is not an OS failure."""
    code = _os_errno(err)
    if code is None and not isinstance(err, OSError):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    free = free_bytes(folder)
    if code in _SPACE_ERRNOS or (free is not None and free < needed):
        reason = f"no space left on the device ({fmt_bytes(needed)} needed, {fmt_bytes(free)} free in {folder})"
    elif code in _PERMISSION_ERRNOS:
        reason = f"no permission to write in {folder} ({os.strerror(code)})"
    else:
        reason = f"{os.strerror(code) if code else err} ({fmt_bytes(needed)} needed, {fmt_bytes(free)} free)"
    out = CheckpointWriteError(code or errno.EIO, f"could not write {what} {path}: {reason}")
    out.path, out.needed, out.free = path, needed, free
    return out


def staging_path(path: str) -> str:
    """The temporary folder checkpoint `path` is written into before the rename."""
    return path.rstrip("/\\") + ".tmp"


def prepare_staging(path: str) -> str:
    """Create an empty staging folder for checkpoint `path` (for writers other than rank 0 to fill
    before `write_checkpoint(..., staged=True)` completes it); returns it."""
    tmp = staging_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def discard_staging(path: str) -> None:
    shutil.rmtree(staging_path(path), ignore_errors=True)


def write_checkpoint(path: str, save_adapter: Callable[[str], None], state: bytes, info: dict[str, Any],
                     needed: int, staged: bool = False) -> None:
    """Write checkpoint folder `path` as a set: adapter (via `save_adapter(folder)`), trainer state
    bytes and the JSON summary into `path.tmp`, fsync, then rename over `path`.  `staged`: the
    staging folder exists already and holds files the other ranks wrote (FSDP shards): it is
    completed, not emptied, and renamed only now that every rank's part is in it."""
    tmp = staging_path(path)
    try:
        if not staged:
            prepare_staging(path)
        save_adapter(tmp)
        _write_bytes(os.path.join(tmp, STATE_NAME), state)
        _write_bytes(os.path.join(tmp, STATE_JSON), json.dumps(info, indent=2).encode("utf-8"))
        _fsync_tree(tmp)
        if os.path.isdir(path):  # the same step written again (a resumed run): the new set replaces the old
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        clear = write_error(err, "checkpoint", path, needed) if isinstance(err, Exception) else None
        if clear is None:
            raise
        raise clear from err


def check_writable(folder: str) -> None:
    """Create `folder` if needed and prove a file can be created in it; `OSError` with a one-line
    message otherwise (running as root, permission bits alone do not tell, so this really creates a file)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the output folder {folder}: {err.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastpeft-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"the output folder {folder} is not writable: {err.strerror}") from None
