"""Adapter files: replaced as a set, read with errors that name the file, never unpickled unsafely.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`; each is useless without
the other, so `write_file_set` replaces them together.  Its steps, and what a kill after each leaves:

1. every new file is written and fsynced under a staged name (`.NAME.new`)   -> the old set
2. a marker naming the staged files (`.fastpeft-pending.json`) is written atomically -> the new set
3. each staged file is renamed over its final name                           -> the new set
4. the marker is removed                                                     -> the new set

From step 2 on, readers (`adapter_file`) take a staged file while the marker names it and it exists, so a
folder always reads as the old or the new set; the next `write_file_set` into the folder first finishes an
interrupted one (renames what the marker names).  A reader that does not know the marker (HF PEFT) sees the
final names, which hold a mixed set only between the renames of step 3 of a killed save.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from typing import Callable

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PENDING_NAME = ".fastpeft-pending.json"

Writer = Callable[[str], None]


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: str, write: Writer) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # a fresh name the writer creates itself: the file's mode follows the umask (0644 under 022, as PEFT's
    # files), where mkstemp would leave it 0600 and unreadable to a serving process under another user
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{secrets.token_hex(8)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def text_writer(text: str) -> Writer:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return write


def tensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Writer:
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage (tied weights, views)
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}

    def write(path: str) -> None:
        data = save(plain, metadata=metadata or {"format": "pt"})
        with open(path, "wb") as fh:  # opened here, not by safetensors: the mode follows the umask (as PEFT's)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return write


def atomic_write_text(path: str, text: str) -> None:
    """Write one text file atomically (temp file + rename)."""
    _atomic(path, text_writer(text))


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically (temp file + rename); tied or strided tensors are copied."""
    _atomic(path, tensors_writer(tensors, metadata))


# ---------------------------------------------------------------------------------------------- file sets
def _staged(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}.new")


def _pending(directory: str) -> list[str]:
    """The file names an interrupted `write_file_set` had fully staged ([] when none)."""
    try:
        with open(os.path.join(directory, PENDING_NAME), encoding="utf-8") as fh:
            names = json.load(fh).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str) and os.path.basename(n) == n]


def adapter_file(directory: str | os.PathLike, name: str) -> str:
    """Path of file `name` of the adapter folder `directory` as its last completed save left it."""
    directory = os.fspath(directory)
    if name in _pending(directory) and os.path.isfile(_staged(directory, name)):
        return _staged(directory, name)
    return os.path.join(directory, name)


def _finish_pending(directory: str) -> None:
    names = _pending(directory)
    for name in names:
        staged = _staged(directory, name)
        if os.path.isfile(staged):
            os.replace(staged, os.path.join(directory, name))
    if names or os.path.exists(os.path.join(directory, PENDING_NAME)):
        _fsync_dir(directory)
        os.remove(os.path.join(directory, PENDING_NAME))
        _fsync_dir(directory)


def _write_error(path: str, err: Exception) -> Exception:
    """One OSError naming the file and the free space for a failed write (safetensors reports a full
    disk as `SafetensorError: ... os error 28`); other errors pass through unchanged."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code is None and "os error 28" in text:
        code = errno.ENOSPC
    if code is None and not isinstance(err, OSError):
        return err
    try:
        free = f"{shutil.disk_usage(os.path.dirname(path) or '.').free} bytes free"
    except OSError:
        free = "free space unknown"
    reason = os.strerror(code) if code is not None else text
    return OSError(code, f"cannot write adapter file {path}: {reason} ({free}); the previous adapter files are "
                         "untouched")


def write_file_set(directory: str | os.PathLike, writers: dict[str, Writer]) -> None:
    """Replace the files named by `writers` in `directory` as one set (see the module docstring):
    after a kill at any point the folder reads as the old set or the new one, never a mix."""
    directory = os.fspath(directory)
    for name in writers:
        if os.path.basename(name) != name or name in ("", ".", "..") or name == PENDING_NAME:
            raise ValueError(f"{name!r} is not a plain file name")
    os.makedirs(directory, exist_ok=True)
    _finish_pending(directory)
    staged: list[str] = []
    try:
        for name, write in writers.items():  # 1. stage
            staged.append(_staged(directory, name))
            write(staged[-1])
    except Exception as err:  # a full disk or a permission error: no partial file stays behind
        for path in staged:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise _write_error(os.path.join(directory, name), err) from err
    _fsync_dir(directory)
    marker = os.path.join(directory, PENDING_NAME)  # 2. commit: the marker appears whole or not at all
    text_writer(json.dumps({"files": list(writers)}))(marker + ".tmp")
    os.replace(marker + ".tmp", marker)
    _fsync_dir(directory)
    for name in writers:  # 3. move into place
        os.replace(_staged(directory, name), os.path.join(directory, name))
    _fsync_dir(directory)
    os.remove(os.path.join(directory, PENDING_NAME))  # 4. done
    _fsync_dir(directory)


# ---------------------------------------------------------------------------------------------- reading
def load_tensors(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read adapter weights from `directory`, with an error naming the file if missing or corrupt.
    A legacy `adapter_model.bin` is read with `weights_only=True`: it cannot run code."""
    directory = os.fspath(directory)
    path = adapter_file(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"adapter weights file {path} is corrupt or truncated: {err}") from None
    legacy = adapter_file(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            tensors = torch.load(legacy, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad (or hostile) file
            raise ValueError(f"adapter weights file {legacy} is corrupt, truncated or not a plain tensor file "
                             f"(fastpeft loads it with weights_only=True): {err}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"adapter weights file {legacy} does not hold a dict of tensors")
        return tensors
    raise FileNotFoundError(f"no adapter weights in {directory}: expected {WEIGHTS_NAME}")
