"""AnyWord annotations as one memory-mapped Arrow file: converted once, opened in a second by every rank and worker.

``anytext2-lcm index-data A.json B.json ... --out anyword.arrow`` streams the AnyWord JSON files (``ijson``: one row
at a time, never a whole ``data_list`` in memory) into an Arrow IPC file (uncompressed, so that it is memory-mapped
without a copy). A run reads it with ``data.index: anyword.arrow`` instead of ``data.json_paths``: opening it maps the
file and reads three small columns; a row is decoded only when its sample is made. Every rank and DataLoader worker
maps the same file, so the annotations sit once in the page cache of a machine, not once per process.

Columns, one entry per ``data_list`` row of the JSON files, in file order:

==============  ===============  ==========================================================================
``file``        uint16           index into the files table (schema metadata ``files``: path, name, root)
``row``         int64            the row's number in its file's ``data_list`` (for ``file.json:row N``)
``raw``         large_string     the row as compact JSON (exactly what ``json.load`` would give)
``wm``          float64          its ``wm_score`` when the reader reaches the watermark filter, else NaN
``bad``         string           why :func:`~.anyword.parse_row` rejects the row (a skip reason), else null
``empty``       uint16           annotations with an empty polygon (counted in ``LoadStats``)
``star``        bool             the caption contains ``*`` (counted in ``LoadStats``)
==============  ===============  ==========================================================================

The reader gives the same samples, skips and load counts as the JSON reader on the same rows, because a row is
parsed by the same :func:`~.anyword.parse_row` (with the run's configuration) when it is read, and the precomputed
columns are those of that function with the watermark threshold left open: the watermark filter (the only
configuration-dependent decision at load) is applied to the ``wm`` column when the file is opened.

Not JSON-standard literals (``NaN``, ``Infinity``) are refused by the streaming parser; ``json.load`` accepts them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections import Counter
from typing import Iterator

import numpy as np

from ..atomic import atomic_path
from .anyword import AnyWordDataset, BadRow, DataConfig, LoadStats, Row, parse_row
from .skips import DataFileError

log = logging.getLogger(__name__)

INDEX_FORMAT = "anytext2-lcm/anyword-index"
INDEX_VERSION = 1
BATCH_ROWS = 32768
"""Rows per Arrow record batch while writing (bounds the converter's memory)."""


def _ijson():
    import ijson

    return ijson


def _json_error(path: str, e: Exception) -> DataFileError:
    msg = " ".join(str(e).split())
    return DataFileError(f"{path}: not valid JSON for the streaming reader ({msg[:200]})")


def stream_annotation_file(path: str | os.PathLike) -> tuple[str, Iterator]:
    """(data_root resolved to a folder, iterator over the rows of ``data_list``) without loading the file.

    The same contract as :func:`~.anyword.load_annotation_file` (a missing file, invalid JSON or a document that is
    not ``{"data_list": [...]}`` raise, naming the file); the rows are parsed one at a time as the iterator is
    consumed (``ijson``; floats as Python floats).
    """
    ijson = _ijson()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            roots = list(ijson.items(f, "data_root"))
        with open(path, "rb") as f:
            head = next(ijson.items(f, "data_list.item", use_float=True), None)
            if head is None:  # no rows: an empty list, or not the AnyWord layout at all
                f.seek(0)
                lists = list(ijson.items(f, "data_list", use_float=True))
                if not lists or not isinstance(lists[0], list):
                    raise DataFileError(f'{path}: expected an object with a "data_list" list (the AnyWord-3M '
                                        f'format)')
    except ijson.JSONError as e:
        raise _json_error(path, e) from None
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    root = roots[0] if roots else ""
    if not isinstance(root, str):
        raise DataFileError(f'{path}: "data_root" must be a string, got {type(root).__name__}')
    if not os.path.isabs(root):
        root = os.path.join(os.path.dirname(os.path.abspath(path)), root)

    def rows() -> Iterator:
        try:
            with open(path, "rb") as f:
                yield from ijson.items(f, "data_list.item", use_float=True)
        except ijson.JSONError as e:
            raise _json_error(path, e) from None

    return root, (rows() if head is not None else iter(()))


def _row_columns(raw, root: str, source: str) -> tuple[float, str | None, int, bool]:
    """(wm, bad, empty, star) of one row: :func:`parse_row` run with the watermark filter shut (where does it stop?)
    and open (what does it reject, what does it count?)."""
    probe = LoadStats()
    reached = parse_row(raw, root, source, _SHUT, probe) is None  # filtered: the row got as far as the wm check
    wm = float(raw["wm_score"]) if reached else math.nan
    stats = LoadStats()
    row = parse_row(raw, root, source, _OPEN, stats)
    bad = row.reason if isinstance(row, BadRow) else None
    return wm, bad, stats.empty_polygon_annotations, bool(stats.captions_with_placeholder)


_SHUT = DataConfig(wm_thresh=-sys.float_info.max)  # JSON numbers are finite: every score is above
_OPEN = DataConfig(wm_thresh=sys.float_info.max)  # and none above


def _schema(files: list[dict]):
    import pyarrow as pa

    meta = {"format": INDEX_FORMAT, "version": str(INDEX_VERSION), "files": json.dumps(files, ensure_ascii=False)}
    return pa.schema([("file", pa.uint16()), ("row", pa.int64()), ("raw", pa.large_string()), ("wm", pa.float64()),
                      ("bad", pa.string()), ("empty", pa.uint16()), ("star", pa.bool_())], metadata=meta)


def _file_entry(path: str, root: str, out_dir: str) -> dict:
    rel = os.path.relpath(root, out_dir) if os.path.isabs(root) else root
    return {"path": path, "name": os.path.basename(path), "root": root, "root_rel": rel}


def write_index(json_paths: list[str], out: str | os.PathLike) -> dict:
    """Convert AnyWord JSON files into one index file (atomically: a temporary name, then a rename).

    Returns a summary ``{"rows", "files": {path: rows}, "bad": {reason: n}}``. Memory stays bounded by one record
    batch (:data:`BATCH_ROWS` rows), whatever the size of the files.
    """
    import pyarrow as pa

    out = os.fspath(out)
    out_dir = os.path.dirname(os.path.abspath(out))
    if len(json_paths) > 65535:
        raise DataFileError(f"{len(json_paths)} annotation files: at most 65535 per index")
    streams = [(os.fspath(p), *stream_annotation_file(p)) for p in json_paths]  # every file checked before writing
    files = [_file_entry(p, root, out_dir) for p, root, _ in streams]
    summary = {"rows": 0, "files": {}, "bad": Counter()}
    schema = _schema(files)
    with atomic_path(out) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for fid, (path, root, rows) in enumerate(streams):
                name, n = os.path.basename(path), 0
                cols: dict[str, list] = {k: [] for k in ("row", "raw", "wm", "bad", "empty", "star")}
                for k, raw in enumerate(rows):
                    wm, bad, empty, star = _row_columns(raw, root, f"{name}:row {k}")
                    for key, v in zip(("row", "raw", "wm", "bad", "empty", "star"),
                                      (k, json.dumps(raw, ensure_ascii=False, separators=(",", ":")), wm, bad,
                                       empty, star)):
                        cols[key].append(v)
                    if bad:
                        summary["bad"][bad] += 1
                    n += 1
                    if len(cols["row"]) == BATCH_ROWS:
                        _write_batch(writer, schema, fid, cols)
                if cols["row"]:
                    _write_batch(writer, schema, fid, cols)
                summary["files"][path] = n
                summary["rows"] += n
                log.info("%s: %d rows indexed", path, n)
    summary["bad"] = dict(summary["bad"])
    return summary


def _write_batch(writer, schema, fid: int, cols: dict[str, list]) -> None:
    import pyarrow as pa

    n = len(cols["row"])
    arrays = [pa.array(np.full(n, fid, dtype=np.uint16)), pa.array(cols["row"], pa.int64()),
              pa.array(cols["raw"], pa.large_string()), pa.array(cols["wm"], pa.float64()),
              pa.array(cols["bad"], pa.string()), pa.array(cols["empty"], pa.uint16()),
              pa.array(cols["star"], pa.bool_())]
    writer.write_batch(pa.record_batch(arrays, schema=schema))
    for v in cols.values():
        v.clear()


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def _open_table(path: str):
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.memory_map(path, "r"))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFileError(f"{path}: not an annotation index written by `anytext2-lcm index-data` ({e})") from None
    meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
    if meta.get("format") != INDEX_FORMAT:
        raise DataFileError(f"{path}: not an annotation index written by `anytext2-lcm index-data`")
    if meta.get("version") != str(INDEX_VERSION):
        raise DataFileError(f"{path}: index version {meta.get('version')}, this reader reads {INDEX_VERSION}; "
                            f"convert the JSON files again with `anytext2-lcm index-data`")
    return reader.read_all(), json.loads(meta["files"])


class IndexedRows:
    """The rows of an index that a configuration keeps, as a sequence of :class:`Row` / :class:`BadRow`.

    ``rows[i]`` decodes row ``i`` from the mapped file and parses it with :func:`parse_row` (the run's settings).
    Picklable: a DataLoader worker re-maps the file (the pages stay shared).

    Attributes:
        kept: (N,) int64 positions in the file of the rows kept (the watermark filter applied).
        load_stats: what loading the JSON files with the same configuration would have counted.
    """

    def __init__(self, path: str | os.PathLike, cfg: DataConfig):
        self.path, self.cfg = os.fspath(path), cfg
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"annotation index not found: {self.path}")
        self._open()
        t = self._table
        wm = t.column("wm").to_numpy()
        keep = ~(wm > cfg.wm_thresh)  # NaN (no score, or rejected before the filter) is kept
        self.kept = np.flatnonzero(keep).astype(np.int64)
        self.load_stats = self._stats(keep)

    def _open(self) -> None:
        table, files = _open_table(self.path)
        here = os.path.dirname(os.path.abspath(self.path))
        self._files = files
        self._roots = [os.path.normpath(os.path.join(here, f["root_rel"])) if not os.path.isabs(f["root_rel"])
                       else f["root_rel"] for f in files]
        self._table = table
        self._chunks = [table.column(k).chunks for k in ("file", "row", "raw")]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks[2]])

    def _stats(self, keep: np.ndarray) -> LoadStats:
        import pyarrow as pa
        import pyarrow.compute as pc

        t = self._table
        fid = t.column("file").to_numpy()
        st = LoadStats(rows=len(keep), filtered_watermark=int((~keep).sum()))
        counts = pc.value_counts(pc.drop_null(t.column("bad").filter(pa.array(keep)))).to_pylist()
        st.malformed = Counter({c["values"]: int(c["counts"]) for c in counts})
        st.empty_polygon_annotations = int(t.column("empty").to_numpy()[keep].sum())
        st.captions_with_placeholder = int(t.column("star").to_numpy(zero_copy_only=False)[keep].sum())
        kept_per_file = np.bincount(fid[keep], minlength=len(self._files))
        st.per_file = {f["path"]: int(n) for f, n in zip(self._files, kept_per_file)}
        return st

    def __len__(self) -> int:
        return len(self.kept)

    def __getstate__(self) -> dict:
        return {"path": self.path, "cfg": self.cfg, "kept": self.kept, "load_stats": self.load_stats}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def raw(self, i: int) -> tuple[int, int, object]:
        """(file id, row number in its file, the row as parsed JSON) of kept row ``i``."""
        p = int(self.kept[i])
        c = int(np.searchsorted(self._starts, p, side="right")) - 1
        j = p - int(self._starts[c])
        fid, k, raw = (col[c][j].as_py() for col in self._chunks)
        return fid, k, json.loads(raw)

    def __getitem__(self, i: int) -> Row | BadRow:
        fid, k, raw = self.raw(i)
        stats = LoadStats()
        row = parse_row(raw, self._roots[fid], f"{self._files[fid]['name']}:row {k}", self.cfg, stats)
        if row is None:  # cannot happen: filtered rows are not in ``kept``
            raise RuntimeError(f"{self.path}: row {i} is filtered by its watermark score")
        return row


def anyword_dataset(cfg: DataConfig, fonts=None):
    """The ``AnyWordDataset`` of a data config: the memory-mapped index of ``data.index`` (rows parsed when read)
    followed by the JSON files of ``data.json_paths``."""
    if not cfg.index:
        return AnyWordDataset(cfg, fonts)
    rows = IndexedRows(cfg.index, cfg)
    return AnyWordDataset(cfg, fonts, rows=rows, load_stats=rows.load_stats)
