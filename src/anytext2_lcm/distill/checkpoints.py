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
fsyncs ``COMPLETE``, renames the folder to its final name, fsyncs the parent, verifies the new checkpoint in full,
and only then rotates (deletes the oldest *usable* checkpoints beyond ``keep_last``, never the newest; checkpoints
that do not verify never count toward ``keep_last`` and are never deleted; a deletion first renames the folder out
of the checkpoint namespace, so a half-deleted folder is never taken for a checkpoint) and removes stale ``.tmp``
folders. A crash at any point leaves the previous complete checkpoint untouched. Every file is written through
:mod:`anytext2_lcm.atomic`.

Loading uses ``safetensors`` for tensors and ``torch.load(weights_only=True)`` for the rest: a file that needs
arbitrary unpickling is refused and nothing in it is executed. Before use, every file is checked against the size and
sha256 recorded in ``COMPLETE``; ``resume latest`` falls back to the previous usable checkpoint (with a warning
naming the rejected ones) when the newest one does not verify. Resume never discards work: when checkpoints exist
but none verifies, ``latest`` stops with an error naming each one and why; ``resume fresh`` moves every existing
checkpoint into ``previous-<time>/`` (ignored by discovery and rotation) and starts from step 0.
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

from ..atomic import commit_dir, fsync_dir, save_safetensors, torch_save, write_json
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
    """Write one payload by its extension (.safetensors, .pt, .json), atomically and fsynced."""
    if path.suffix == ".safetensors":
        save_safetensors(path, {k: v.detach().to("cpu").contiguous().clone() for k, v in obj.items()})
    elif path.suffix == ".pt":
        torch_save(path, obj)
    elif path.suffix == ".json":
        write_json(path, obj, indent=1, sort_keys=True)
    else:
        raise ValueError(f"{path.name}: unknown checkpoint file type (use .safetensors, .pt or .json)")


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
        self._verified: dict[str, tuple] = {}  # name -> _stamp of checkpoints this manager verified in full
        self._warned: set[str] = set()

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
                self._commit(tmp, final, step, micro_in_window)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                if not isinstance(e, (OSError, CheckpointError)):
                    self.all_ok(False)  # let the other ranks leave the collective, then re-raise as is
                    raise
        if not self.all_ok(not error):
            raise CheckpointError(f"committing {name} failed ({error or 'on rank 0'})")
        log.info("saved checkpoint %s", final)
        return final

    def _commit(self, tmp: Path, final: Path, step: int, micro_in_window: int) -> None:
        """Rank 0: the marker (sizes and sha256 of every file), the rename into place, a full verification, and
        only then the rotation."""
        name = final.name
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        marker = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "step": step,
                  "micro_in_window": micro_in_window, "world_size": self.world_size,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
        write_json(tmp / MARKER, marker, indent=1)
        fsync_dir(tmp)
        self._phase("marker_written")
        if final.exists():  # the same position again (a resumed run): replace it, set an unusable one aside
            try:
                self.check(final)
            except CheckpointError as e:
                log.warning("%s is unusable (%s): moved aside, not replaced", final.name, e)
                self._move_aside([final], f"rejected-{name}")
        commit_dir(tmp, final)
        self._phase("renamed")
        self.verify(final, full=True)  # rotation deletes nothing until the new checkpoint verifies
        self._verified[final.name] = _stamp(final)
        self.rotate()
        self._phase("rotated")

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

    def existing(self) -> list[Path]:
        """Every entry named like a checkpoint (complete, damaged or foreign), oldest first. Leftovers of
        interrupted saves and deletions (``….tmp``, ``….old``, ``….trash-…``) are not checkpoints."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if parse_name(p.name) is not None),
                      key=lambda p: parse_name(p.name))

    def check(self, path: Path) -> None:
        """Verify a checkpoint in full (sizes and sha256); a folder already verified by this manager and unchanged
        since (same files, sizes and times) is not hashed again. Raises CheckpointError saying why it is unusable."""
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder")
        stamp = _stamp(path)
        if self._verified.get(path.name) != stamp:
            self.verify(path, full=True)
            self._verified[path.name] = stamp

    def sort_out(self) -> tuple[list[Path], list[tuple[Path, str]]]:
        """(usable checkpoints, [(unusable checkpoint, why)]), each oldest first."""
        good, bad = [], []
        for p in self.existing():
            try:
                self.check(p)
                good.append(p)
            except CheckpointError as e:
                bad.append((p, str(e)))
        return good, bad

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; older ones are tried (with a warning naming the newer ones and why)
        when a newer one fails. None when the folder holds no checkpoint at all.

        Raises:
            CheckpointError: checkpoints exist but none verifies: each is named with the reason (nothing is
                deleted; starting over needs ``checkpoint.resume=fresh``).
        """
        rejected = []
        for p in reversed(self.existing()):
            try:
                self.check(p)
            except CheckpointError as e:
                rejected.append((p, str(e)))
                continue
            for q, why in rejected:
                log.warning("skipping checkpoint %s: %s", q.name, why)
            return p
        if rejected:
            raise CheckpointError(
                f"checkpoint.resume=latest: none of the {len(rejected)} checkpoint(s) in {self.root} is usable ("
                + "; ".join(why for _, why in reversed(rejected)) + "). Nothing was deleted: repair them, resume from "
                "a folder (checkpoint.resume=PATH), or start over with checkpoint.resume=fresh (they are then moved "
                "aside, not deleted)")
        return None

    # ---- rotation -----------------------------------------------------------------------------------------

    def rotate(self) -> list[Path]:
        """Delete the oldest usable checkpoints beyond ``keep_last`` and leftovers of interrupted saves/deletes.

        Only rank 0 calls this (inside :meth:`save`, after the new checkpoint is complete and verified). Only
        checkpoints that verify count toward ``keep_last``; unusable ones are never counted and never deleted (a
        warning names them). The newest usable checkpoint is never deleted. Returns the deleted folders.
        """
        good, bad = self.sort_out()
        for p, why in bad:
            if p.name not in self._warned:
                self._warned.add(p.name)
                log.warning("checkpoint %s is unusable and does not count toward keep_last=%d (left in place): %s",
                            p.name, self.keep_last, why)
        deleted = []
        for p in good[:max(len(good) - self.keep_last, 0)]:
            _delete(p)
            self._verified.pop(p.name, None)
            deleted.append(p)
            log.info("rotation: deleted %s (keep_last=%d)", p.name, self.keep_last)
        for p in self.root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or ".trash" in p.name or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True)
        return deleted

    def set_aside(self) -> Path | None:
        """Move every checkpoint (usable or not) into ``previous-<time>/`` inside :attr:`root`, where discovery and
        rotation do not look: a fresh start that loses nothing. Returns that folder (None: nothing to move)."""
        found = self.existing()
        if not found:
            return None
        dest = self._move_aside(found, "previous")
        log.warning("checkpoint.resume=fresh: moved %d existing checkpoint(s) to %s (nothing deleted); starting from "
                    "step 0", len(found), dest)
        return dest

    def _move_aside(self, paths: list[Path], label: str) -> Path:
        """Move ``paths`` into a new folder ``LABEL-<time>`` of :attr:`root` (a name discovery ignores)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = self.root / f"{label}-{stamp}", 1
        while dest.exists():
            n += 1
            dest = self.root / f"{label}-{stamp}-{n}"
        dest.mkdir()
        for p in paths:
            os.replace(p, dest / p.name)
            self._verified.pop(p.name, None)
        fsync_dir(self.root)
        return dest

    # ---- loading ------------------------------------------------------------------------------------------

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None for a fresh start (``None``; ``"fresh"`` first moves the existing
        checkpoints aside, :meth:`set_aside`), ``"latest"`` (:meth:`latest`) or a folder (verified in full)."""
        if resume is None:
            return None
        if resume == "latest":
            return self.latest()
        if resume == "fresh":
            self.set_aside()
            return None
        path = Path(resume)
        self.verify(path, full=True)
        return path


def _stamp(path: Path) -> tuple:
    """What a folder holds, cheaply: (name, bytes, modification time) of every entry."""
    out = []
    for p in sorted(path.iterdir()):
        st = p.stat()
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _delete(path: Path) -> None:
    """Rename the folder out of the checkpoint namespace first (atomic: a half-deleted folder is never taken for a
    checkpoint, usable or not), then remove it."""
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


def average_checkpoints(paths: list[str | os.PathLike], name: str = "trainable.safetensors") -> dict[str, torch.Tensor]:
    """The uniform average of one tensor file over several checkpoints of a run (post-hoc weight averaging, as in
    SWA and checkpoint averaging: the mean of late weights of one trajectory reads better than its last point).

    ``torch.optim.swa_utils.AveragedModel`` averages a live model during training; this averages finished
    checkpoints after it, so a recipe can choose the window without retraining. Every checkpoint is verified in full
    (sizes and sha256 against its marker) before any is read: a damaged one raises and nothing is averaged.
    Floating tensors are summed in float64 and returned in their own dtype; other tensors (counters such as
    BatchNorm's ``num_batches_tracked``) are the last checkpoint's.

    Raises:
        CheckpointError: no paths, a checkpoint that does not verify, or checkpoints whose tensors differ in names,
            shapes or dtypes.
    """
    if not paths:
        raise CheckpointError("average_checkpoints: no checkpoints given")
    paths = [Path(p) for p in paths]
    for p in paths:
        CheckpointManager(p.parent).verify(p, full=True)
    acc: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    for p in paths:
        tensors = CheckpointReader(p).tensors(name)
        if not first:
            first = tensors
            acc = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
            continue
        if tensors.keys() != first.keys():
            diff = sorted(set(tensors) ^ set(first))
            raise CheckpointError(f"{p / name}: tensor names differ from {paths[0] / name} ({diff[:3]})")
        for k, v in tensors.items():
            if v.shape != first[k].shape or v.dtype != first[k].dtype:
                raise CheckpointError(f"{p / name}: {k} is {v.dtype} {tuple(v.shape)}, in {paths[0] / name} "
                                      f"{first[k].dtype} {tuple(first[k].shape)}")
            acc[k] = acc[k] + v.double() if v.is_floating_point() else v
    return {k: (v / len(paths)).to(first[k].dtype) if first[k].is_floating_point() else v for k, v in acc.items()}
