"""Atomic writes: every file and folder the package writes appears whole or not at all.

A file is written to a hidden temporary name in the same folder (``.NAME.<pid>-<random>.tmp<ext>``), flushed to
disk (fsync) and renamed over the destination with ``os.replace``, which is atomic within a file system. When the
write fails part-way (disk full, a file-size limit, a signal, a bug in the serialiser) the temporary file is
removed and the destination is left exactly as it was: the previous bytes survive and no partial file remains.
A folder is built under a temporary name and swapped in by :func:`commit_dir` (the old folder is renamed aside,
the new one renamed into place, then the old one deleted; a failure between the two renames puts the old one back).

Written by hand because the standard library has no atomic write and the library that offered one
(``atomicwrites``) is archived; this module is the one place that does it (images, reports, adapters, exports,
converted models, checkpoints, metrics, JSON).

Failures surface as :class:`WriteError` (an ``OSError``) naming the destination and saying that the previous file
is unchanged; the command line prints it as one line.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class WriteError(OSError):
    """Writing a file or folder failed; the destination was left as it was (nothing partial remains)."""


def _temp_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _error(path: Path, e: BaseException, existed: bool) -> WriteError:
    kept = "the previous version is unchanged" if existed else "nothing was written"
    detail = f"{type(e).__name__}: {e}" if not isinstance(e, OSError) or not e.strerror else e.strerror
    err = WriteError(f"could not write {path} ({detail}); {kept}")
    err.errno = getattr(e, "errno", None)
    return err


@contextmanager
def atomic_path(path: str | os.PathLike, wrap_all: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block succeeds.

    The parent folder is created. On any exception the temporary file is removed and ``path`` is untouched; an
    ``OSError`` (and with ``wrap_all`` any exception: the block is only a serialiser) is re-raised as
    :class:`WriteError`.
    """
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"could not write {path}: it is a folder")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _error(path, e, existed) from e
    tmp = _temp_name(path, "tmp" + path.suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, WriteError) or not (isinstance(e, OSError) or (wrap_all and isinstance(e, Exception))):
            raise
        raise _error(path, e, existed) from e
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> Path:
    """Serialise ``obj`` (``json.dumps`` options, default ``indent=1``) and write it atomically; an object that
    cannot be serialised raises before anything is written."""
    dumps_kwargs.setdefault("indent", 1)
    return write_text(path, json.dumps(obj, **dumps_kwargs))


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError, what: str = "JSON file") -> Any:
    """The reading side of :func:`write_json`: a missing file raises ``FileNotFoundError``, unparsable content
    ``error`` — both one line naming the file (``what`` says what it should have been)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not a valid {what} ({e})") from None


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format of an image path's extension (``.png`` → ``PNG``).

    Raises:
        ValueError: an extension Pillow cannot write.
    """
    from PIL import Image

    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if not ext or fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{path}: unknown image extension {ext or '(none)'!r} (use .png, .jpg, .webp, ...)")
    return fmt


def save_image(path: str | os.PathLike, image, **params) -> Path:
    """Encode an image (PIL image or (H, W[, C]) uint8 array) by the extension of ``path`` (or ``format=``) in
    memory, then write it atomically."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    fmt = params.pop("format", None) or image_format(path)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return write_bytes(path, buf.getvalue())


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` (contiguous CPU copies of ``tensors``) written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, wrap_all=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` written atomically."""
    import torch

    with atomic_path(path, wrap_all=True) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------------------


def new_temp_dir(path: str | os.PathLike) -> Path:
    """An empty hidden folder beside ``path`` to build its new content in (see :func:`commit_dir`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    tmp.mkdir()
    return tmp


def commit_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Put the finished folder ``tmp`` at ``path``, replacing what is there; the old content is deleted only once
    the new folder is in place (a failure in between puts it back)."""
    tmp, path = Path(tmp), Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"could not write {path}: a file is in the way of the folder")
    fsync_dir(tmp)
    if path.exists():
        old = _temp_name(path, "old")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; it replaces ``path`` when the block succeeds and is removed
    (``path`` untouched) when it fails."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"could not write {path}: a file is in the way of the folder")
    existed = path.exists()
    try:
        tmp = new_temp_dir(path)
    except OSError as e:
        raise _error(path, e, existed) from e
    try:
        yield tmp
        commit_dir(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise _error(path, e, existed) from e
        raise


__all__ = ["WriteError", "atomic_dir", "atomic_path", "commit_dir", "fsync_dir", "image_format", "new_temp_dir", "read_json",
           "save_image", "save_safetensors", "torch_save", "write_bytes", "write_json", "write_text"]
