"""The annotation index (`anytext2-lcm index-data`, `data.index`): the same samples, skips and load counts as the
JSON reader on the same rows; streaming conversion; shared by worker processes; clear errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from anytext2_lcm.cli import main
from anytext2_lcm.config import ConfigError
from anytext2_lcm.data.anyword import AnyWordDataset, DataConfig
from anytext2_lcm.data.index import IndexedRows, anyword_dataset, write_index
from anytext2_lcm.data.skips import DataFileError, SkipRecord

from test_data_validation import S, datasets  # noqa: F401  (the damaged dataset: one row per skip reason)


@pytest.fixture(scope="module")
def files(datasets):  # noqa: F811
    """The damaged file with watermark scores, '*' captions and empty polygons added, then the intact one."""
    good, bad = datasets
    content = json.loads(open(bad).read())
    rows = content["data_list"]
    for i, r in enumerate(rows):
        if isinstance(r, dict) and i % 3 == 0:
            r["wm_score"] = [0.1, 0.7, 0.95][i % 9 // 3]
    rows[17]["caption"] = "a * in the caption"
    rows[18]["annotations"].append({"polygon": []})
    rows[19]["wm_score"] = "high"  # a bad type: a skip, not a filtered row
    from pathlib import Path

    p = Path(bad).parent / "scored.json"  # beside the damaged images (data_root is relative)
    p.write_text(json.dumps(content, ensure_ascii=False))
    return [str(p), good]


def same(a, b) -> bool:
    if isinstance(a, SkipRecord) or isinstance(b, SkipRecord):
        return a == b
    return a.keys() == b.keys() and all(np.array_equal(v, b[k]) if isinstance(v, np.ndarray) else v == b[k]
                                        for k, v in a.items())


@pytest.mark.parametrize("wm_thresh", [1.0, 0.5])
def test_index_gives_the_json_readers_samples_skips_and_counts(files, tmp_path, wm_thresh):
    index = tmp_path / "anyword.arrow"
    summary = write_index(files, index)
    assert summary["rows"] == 2 * 24 and summary["files"] == {files[0]: 24, files[1]: 24}
    js = AnyWordDataset(DataConfig(json_paths=tuple(files), image_size=S, wm_thresh=wm_thresh))
    ix = anyword_dataset(DataConfig(index=str(index), image_size=S, wm_thresh=wm_thresh))
    assert len(ix) == len(js) < 48 if wm_thresh < 1 else len(ix) == len(js) == 48
    assert ix.load_stats == js.load_stats
    st = js.load_stats
    assert st.malformed["bad_field_type"] >= 4 and st.empty_polygon_annotations == 1
    assert st.captions_with_placeholder == 1
    assert st.filtered_watermark == (0 if wm_thresh == 1.0 else 5)
    kinds = set()
    for i in range(len(js)):
        a, b = js[i], ix[i]
        assert same(a, b), (i, a if isinstance(a, SkipRecord) else "sample", b if isinstance(b, SkipRecord) else "")
        kinds.add(a.reason if isinstance(a, SkipRecord) else "sample")
    assert len(kinds) >= 10  # samples and most skip reasons were compared


def test_index_rows_travel_to_worker_processes(files, tmp_path):
    index = tmp_path / "a.arrow"
    write_index(files[1:], index)
    rows = IndexedRows(index, DataConfig(image_size=S))
    copy = pickle.loads(pickle.dumps(rows))
    assert len(pickle.dumps(rows)) < 2000  # the file is re-mapped, not copied
    assert [copy[i].img_path for i in range(len(copy))] == [rows[i].img_path for i in range(len(rows))]


def test_index_data_command_and_its_errors(files, tmp_path, capsys):
    out = tmp_path / "x.arrow"
    assert main(["index-data", *files, "--out", str(out)]) == 0
    assert "48 rows from 2 file(s)" in capsys.readouterr().out
    assert main(["index-data", files[1], "--out", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"data_root": "x", "data_list": [{"img_name": "a.jpg"},')
    assert main(["index-data", str(broken), "--out", str(tmp_path / "y.arrow")]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y.arrow").exists() and not list(tmp_path.glob(".y.arrow*"))
    other = tmp_path / "other.json"
    other.write_text('{"rows": []}')
    with pytest.raises(DataFileError, match="data_list"):
        write_index([str(other)], tmp_path / "z.arrow")
    with pytest.raises(DataFileError, match="index-data"):
        IndexedRows(broken, DataConfig())
    with pytest.raises(ConfigError, match="one data source"):
        DataConfig(json_paths=(files[0],), index=str(out))
