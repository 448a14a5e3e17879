"""Training checkpoints that lose nothing: atomic writes, a completeness marker, discovery, rotation, safe loading.

Layout (``OUTPUT/checkpoints/``)::

    checkpoint-000100/              after optimizer step 100 (a step boundary)
    checkpoint-000100-m1/           after step 100 and 1 micro-step of step 101 (preempted inside an accumulation
                                    window; it then also holds the partially accumulated gradients)
        trainable.safetensors       the weights that train (LoRA, or a teacher run's WriteNet / embedding manager /
                                    AttnX) and the buffers of modules in training mode, fp32, by model name
        optimizer.pt                optimizer.state_dict()        (tensors + primitives)
        scheduler.pt                lr_scheduler.state_dict()     (primitives)
        scaler.pt                   the fp16 gradient scaler's state (only when one is active)
        grads_rank{r}.safetensors   rank r's accumulated gradients (only inside a window)
        rng_rank{r}.pt              rank r's Python / NumPy / torch / CUDA random states (``state.capture_rng``)
        data_rank{r}.json           rank r's data position: epoch, samples consumed in it, skip counters
        train_state.json            ``state.TrainState``, the structural config, the teacher fingerprint, world size
        COMPLETE                    JSON written last: format, name, files {name: {bytes, sha256}}

Write protocol (every rank calls :meth:`CheckpointManager.save`; there is no rank-0-only path that could leave the
others waiting): rank 0 creates ``checkpoint-….tmp/``; every rank checks that its tensors are finite (a checkpoint
never holds NaN/Inf) and writes its files, each fsynced; after a barrier rank 0 hashes every file, writes and
fsyncs ``COMPLETE``, renames the folder to its final name, fsyncs the parent, and only then rotates (deletes the
oldest complete checkpoints beyond ``keep_last``, never the newest; a deletion first removes ``COMPLETE`` so a
half-deleted folder is never taken for a complete one) and removes stale ``.tmp`` folders. A crash at any point
leaves the previous complete checkpoint untouched; discovery ignores folders without a valid ``COMPLETE``.

Loading uses ``safetensors`` for tensors and ``torch.load(weights_only=True)`` for the rest: a file that needs
arbitrary unpickling is refused and nothing in it is executed. Before use, every file is checked against the size and
sha256 recorded in ``COMPLETE``; ``resume latest`` falls back to the previous complete checkpoint (with a warning)
when the newest one does not verify.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import CheckpointError, safe_torch_load, sha256_file

log = logging.getLogger(__name__)

FORMAT = "anytext2-lcm/train-checkpoint"
FORMAT_VERSION = 1
MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)(?:-m(\d+))?$")
PHASES = ("begin", "files_written", "marker_written", "renamed", "rotated")
"""Points of a save at which a test can inject a failure (``fault`` hook): after the temporary folder exists;
after this rank's files are written; after the marker is written but before the rename; after the rename, before
rotation; after rotation."""


class NonFiniteCheckpointError(CheckpointError):
    """Refused to write a checkpoint: a tensor holds NaN or Inf."""


@dataclass(frozen=True, order=True)
class CheckpointInfo:
    """A complete checkpoint folder: its position and path (ordered by position)."""

    step: int
    micro: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


def checkpoint_name(step: int, micro_in_window: int = 0) -> str:
    """``checkpoint-000100`` at a step boundary, ``checkpoint-000100-m1`` one micro-step into the next window."""
    return f"checkpoint-{step:06d}" + (f"-m{micro_in_window}" if micro_in_window else "")


def parse_name(name: str) -> tuple[int, int] | None:
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensors_in(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def nonfinite_entries(payload: dict[str, Any]) -> list[str]:
    """Names of the files whose floating tensors hold NaN or Inf."""
    bad = []
    for name, obj in payload.items():
        if name.endswith(".json"):
            continue
        for t in _tensors_in(obj):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name)
                break
    return bad


def _write_file(path: Path, obj: Any) -> None:
    """Write one payload by its extension (.safetensors, .pt, .json) and fsync it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in obj.items()}, str(path))
    elif path.suffix == ".pt":
        torch.save(obj, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    else:
        raise ValueError(f"{path.name}: unknown checkpoint file type (use .safetensors, .pt or .json)")
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _noop() -> None:
    return None


def _same(ok: bool) -> bool:
    return ok


class CheckpointManager:
    """Atomic save, discovery, verification, rotation and loading of training checkpoints (see module docstring).

    Args:
        root: the checkpoints folder (``OUTPUT/checkpoints``).
        keep_last: complete checkpoints to keep (>= 1).
        rank, world_size: this process in the data-parallel group.
        barrier: waits for all ranks (``accelerator.wait_for_everyone``); a no-op in one process.
        all_ok: ``all_ok(flag)`` → True iff every rank passed True (a MIN all-reduce); identity in one process.
        fault: test hook called as ``fault(phase)`` at each of :data:`PHASES`; raising there simulates a crash.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 3, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = _noop, all_ok: Callable[[bool], bool] = _same,
                 fault: Callable[[str], None] | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: must be >= 1")
        self.root = Path(root)
        self.keep_last = int(keep_last)
        self.rank, self.world_size = rank, world_size
        self.barrier, self.all_ok, self.fault = barrier, all_ok, fault

    def _phase(self, name: str) -> None:
        if self.fault is not None:
            self.fault(name)

    # ---- saving -------------------------------------------------------------------------------------------

    def save(self, step: int, micro_in_window: int, shared: dict[str, Any], local: dict[str, Any]) -> Path:
        """Write a checkpoint atomically; every rank must call this with the same ``step`` and ``micro_in_window``.

        Args:
            shared: files written once, by rank 0 (weights, optimizer, scheduler, train state); other ranks may
                pass an empty dict.
            local: this rank's files (names should carry the rank, e.g. ``rng_rank1.pt``).
        Returns:
            The final folder.
        Raises:
            NonFiniteCheckpointError: some rank's tensors hold NaN/Inf (nothing is kept).
            CheckpointError: the write failed on some rank (nothing is kept; the previous checkpoints are intact).
        """
        name = checkpoint_name(step, micro_in_window)
        final = self.root / name
        tmp = self.root / (name + ".tmp")
        main = self.rank == 0
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        self._phase("begin")

        mine = dict(local)
        if main:
            mine.update(shared)
        bad = nonfinite_entries(mine)
        if not self.all_ok(not bad):
            self.barrier()
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            detail = f" (rank {self.rank}: {', '.join(bad)})" if bad else ""
            raise NonFiniteCheckpointError(f"refused to save {name}: tensors hold NaN/Inf{detail}; the previous "
                                           f"checkpoint is kept")
        error = ""
        try:
            for fname, obj in mine.items():
                _write_file(tmp / fname, obj)
        except Exception as e:  # disk full, permissions: reported by every rank below, nothing committed
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        if not self.all_ok(not error):
            self.barrier()
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"writing {name} failed ({error or 'on another rank'}); the previous checkpoint "
                                  f"is kept")
        self._phase("files_written")
        self.barrier()

        error = ""
        if main:
            try:
                files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(tmp.iterdir()) if p.is_file()}
                marker = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "step": step,
                          "micro_in_window": micro_in_window, "world_size": self.world_size,
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
                with open(tmp / MARKER, "w") as f:
                    json.dump(marker, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                self._phase("marker_written")
                if final.exists():  # the same position saved again (e.g. a resumed run): replace it atomically
                    old = self.root / (name + ".old")
                    if old.exists():
                        shutil.rmtree(old)
                    os.replace(final, old)
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
                _fsync_dir(self.root)
                self._phase("renamed")
                self.rotate()
                self._phase("rotated")
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                if not isinstance(e, (OSError, CheckpointError)):
                    self.all_ok(False)  # let the other ranks leave the collective, then re-raise as is
                    raise
        if not self.all_ok(not error):
            raise CheckpointError(f"committing {name} failed ({error or 'on rank 0'})")
        log.info("saved checkpoint %s", final)
        return final

    # ---- discovery ----------------------------------------------------------------------------------------

    def complete(self) -> list[CheckpointInfo]:
        """Folders with a marker, oldest first (sizes are checked by :meth:`verify`, not here)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            pos = parse_name(p.name)
            if pos is not None and p.is_dir() and (p / MARKER).is_file():
                out.append(CheckpointInfo(pos[0], pos[1], p))
        return sorted(out)

    def verify(self, path: str | os.PathLike, full: bool = True) -> dict:
        """Check a checkpoint against its marker: every file present with its size (and sha256 if ``full``).

        Returns:
            The marker's content.
        Raises:
            CheckpointError: no marker, unreadable marker, a missing / truncated / altered file, or a file that the
                marker does not list.
        """
        path = Path(path)
        mf = path / MARKER
        if not mf.is_file():
            raise CheckpointError(f"{path}: no {MARKER} marker: an incomplete or foreign checkpoint")
        try:
            marker = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{mf}: unreadable marker ({e})") from None
        if marker.get("format") != FORMAT:
            raise CheckpointError(f"{mf}: format {marker.get('format')!r} is not {FORMAT!r}")
        files = marker.get("files") or {}
        for fname, info in files.items():
            fp = path / fname
            if not fp.is_file():
                raise CheckpointError(f"{path}: {fname} is missing")
            if fp.stat().st_size != info["bytes"]:
                raise CheckpointError(f"{fp}: {fp.stat().st_size} bytes, the marker recorded {info['bytes']} "
                                      f"(truncated or altered)")
            if full and sha256_file(fp) != info["sha256"]:
                raise CheckpointError(f"{fp}: sha256 differs from the marker (corrupt or altered)")
        extra = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MARKER and p.name not in files)
        if extra:
            raise CheckpointError(f"{path}: files not listed in the marker: {extra}")
        return marker

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; older ones are tried (with a warning) when a newer one fails."""
        for info in reversed(self.complete()):
            try:
                self.verify(info.path, full=True)
                return info.path
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", info.path, e)
        return None

    # ---- rotation -----------------------------------------------------------------------------------------

    def rotate(self) -> list[Path]:
        """Delete the oldest complete checkpoints beyond ``keep_last`` and leftovers of interrupted saves/deletes.

        Only rank 0 calls this (inside :meth:`save`, after the new checkpoint is complete). The newest complete
        checkpoint is never deleted. Returns the deleted folders.
        """
        deleted = []
        done = self.complete()
        for info in done[:max(len(done) - self.keep_last, 0)]:
            _delete(info.path)
            deleted.append(info.path)
            log.info("rotation: deleted %s (keep_last=%d)", info.path.name, self.keep_last)
        for p in self.root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or ".trash" in p.name or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and parse_name(p.name) is not None and not (p / MARKER).is_file():
                _delete(p)  # a folder whose deletion was interrupted after its marker went
        return deleted

    # ---- loading ------------------------------------------------------------------------------------------

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None for a fresh start, "latest" or a folder (verified in full)."""
        if resume is None:
            return None
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        self.verify(path, full=True)
        return path


def _delete(path: Path) -> None:
    marker = path / MARKER
    if marker.exists():
        marker.unlink()  # from here on the folder is not a complete checkpoint, whatever happens below
    trash = path.with_name(path.name + f".trash-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Reading one checkpoint
# ---------------------------------------------------------------------------------------------------------------


class CheckpointReader:
    """Typed access to the files of a verified checkpoint folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        p = self.path / name
        try:
            return load_file(str(p))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: {name} is missing") from None
        except Exception as e:
            raise CheckpointError(f"{p}: unreadable safetensors file ({e})") from None

    def obj(self, name: str) -> Any:
        """A ``.pt`` file through ``torch.load(weights_only=True)``; arbitrary pickles are refused, not executed."""
        p = self.path / name
        if not p.is_file():
            raise CheckpointError(f"{self.path}: {name} is missing")
        return safe_torch_load(p)

    def json(self, name: str) -> Any:
        p = self.path / name
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: {name} is missing") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p}: corrupt JSON ({e})") from None
