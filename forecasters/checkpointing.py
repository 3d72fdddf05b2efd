"""Checkpoints that survive crashes: atomic writes, the random state for exact resumes, finding ``last.ckpt``.

* :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the target folder,
  flushes it to disk and renames it over the target, so a process killed while saving leaves the
  previous checkpoint intact. Lightning's own ``TorchCheckpointIO`` (2.6) goes through an fsspec
  transaction that writes the temporary file to the system temp folder and then *moves* it: a copy
  (not atomic) when that folder is on another file system, nothing flushed to disk, and a stray
  temporary file after a kill. The CLI uses this plugin by default.
* :func:`capture_rng_states` / :func:`restore_rng_states` keep the global random generators in a
  checkpoint (as plain tensors and numbers, so ``weights_only=True`` loading still works): resuming
  then replays the same batch order and dropout masks as an uninterrupted run.
* :func:`find_last_checkpoint` resolves ``--ckpt_path last`` to ``checkpoints/<run_id>/last.ckpt``.
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer

__all__ = [
    "AtomicCheckpointIO",
    "LAST_CHECKPOINT",
    "capture_rng_states",
    "find_last_checkpoint",
    "read_checkpoint",
    "restore_rng_states",
    "use_atomic_checkpoints",
]

LAST_CHECKPOINT = "last.ckpt"
_TEMP_SUFFIX = ".partial"


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: temp file in the same folder, fsync, ``os.replace``.

    Remote paths (``s3://``, ...) are left to Lightning's fsspec writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        # A dot name with a suffix other than .ckpt: never taken for a checkpoint, even half-written.
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}")
        try:
            with open(temp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        _fsync_folder(target.parent)


def _remove_stale_temps(target: Path) -> None:
    """Temp files of ``target`` left by a process killed while saving."""
    for stale in target.parent.glob(f".{target.name}.*{_TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    # makes the rename itself durable; not every platform can open a folder
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def use_atomic_checkpoints(trainer: Trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was configured with a checkpoint plugin of its own."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def capture_rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and CUDA), numpy and Python, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached_gauss)],
        "python": [int(version), list(python_state), gauss_next],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global random generators to what :func:`capture_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("torch.cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    version, python_state, gauss_next = states["python"]
    random.setstate((version, tuple(python_state), gauss_next))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file on the CPU (``weights_only``); ValueError naming the file when it is not one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # unpickling errors come in many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]}); pass a .ckpt "
                         "file written by `titans-ts fit` or Trainer.save_checkpoint") from exc
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint; pass a .ckpt file "
                         "written by `titans-ts fit` or Trainer.save_checkpoint")
    return checkpoint


def find_last_checkpoint(root: str | os.PathLike[str], run_id: str | None = None) -> Path | None:
    """``<root>/checkpoints/<run_id>/last.ckpt``; without ``run_id`` the most recently written one; None if none."""
    folder = Path(root) / "checkpoints"
    if run_id is not None:
        path = folder / run_id / LAST_CHECKPOINT
        return path if path.is_file() else None
    candidates = [p for p in folder.glob(f"*/{LAST_CHECKPOINT}") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None
