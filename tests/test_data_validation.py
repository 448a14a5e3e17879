"""Bad samples: a damaged copy of a synthetic dataset is read without crashing, every damaged row skipped with the
right reason, counts exact, the rest loads; the skip-rate guard; unusable files; the validate-data report."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from anytext2_lcm.cli import main
from anytext2_lcm.data.anyword import AnyWordDataset, DataConfig
from anytext2_lcm.data.collate import AnyWordCollate, make_dataloader
from anytext2_lcm.data.fonts import FontNotFoundError, find_default_font
from anytext2_lcm.data.skips import SKIP_REASONS, SkipRecord, TooManySkipsError
from anytext2_lcm.data.validate import format_report, validate_files

S = 256
N = 24

# row index -> the reason its damage must be skipped for
DAMAGE = {
    1: "image_missing",        # image file deleted
    2: "image_unreadable",     # JPEG cut after 300 bytes
    3: "image_unreadable",     # not an image at all
    4: "malformed_row",        # annotation truncated to its polygon (no text, no language)
    5: "malformed_row",        # row truncated to a bare string
    6: "bad_field_type",       # text is a number
    7: "bad_field_type",       # caption is a list
    8: "bad_field_type",       # language is null
    9: "bad_field_type",       # polygon coordinates are strings
    10: "polygon_outside",     # polygon moved 3000 px right
    11: "polygon_degenerate",  # two points
    12: "polygon_degenerate",  # zero thickness
    13: "empty_text",          # text ""
    14: "unrenderable_text",   # a private-use character no font has
    15: "image_size",          # 8 x 8 px image
    16: "image_size",          # 4000 x 100 px image
}
EXPECTED = Counter(DAMAGE.values())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    try:
        find_default_font()
    except FontNotFoundError as e:
        pytest.skip(f"no CJK-capable system font: {e}")
    from anytext2_lcm.data.synthetic import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("damage")
    (good,) = write_dataset(SynthConfig(num=N, size=S, seed=1, invalid_prob=0.0), root / "good")
    shutil.copytree(root / "good", root / "bad")
    bad = root / "bad" / good.name
    content = json.loads(bad.read_text())
    rows = content["data_list"]
    img = root / "bad" / "images"

    def first_valid(i):
        return next(a for a in rows[i]["annotations"] if a.get("valid", True))

    (img / rows[1]["img_name"]).unlink()
    data = (img / rows[2]["img_name"]).read_bytes()
    (img / rows[2]["img_name"]).write_bytes(data[:300])
    (img / rows[3]["img_name"]).write_bytes(b"this is not an image\n" * 20)
    ann = first_valid(4)
    for k in ("text", "language", "valid", "color"):
        ann.pop(k, None)
    rows[5] = rows[5]["img_name"]
    first_valid(6)["text"] = 12345
    rows[7]["caption"] = ["a", "list"]
    first_valid(8)["language"] = None
    first_valid(9)["polygon"] = [[str(x), str(y)] for x, y in first_valid(9)["polygon"]]
    first_valid(10)["polygon"] = [[x + 3000, y] for x, y in first_valid(10)["polygon"]]
    first_valid(11)["polygon"] = first_valid(11)["polygon"][:2]
    first_valid(12)["polygon"] = [[10, 10], [200, 10], [200, 10], [10, 10]]
    first_valid(13)["text"] = ""
    first_valid(14)["text"] = "\U0010fffd\U0010fffd"
    Image.new("RGB", (8, 8), "white").save(img / rows[15]["img_name"], format="JPEG")
    Image.new("RGB", (4000, 100), "white").save(img / rows[16]["img_name"], format="JPEG")
    bad.write_text(json.dumps(content, ensure_ascii=False))
    return str(good), str(bad)


def cfg(path, **kw):
    return DataConfig(json_paths=(path,), image_size=S, **kw)


def test_damage_kinds_cover_at_least_eight_reasons():
    assert len(EXPECTED) >= 8 and set(EXPECTED) <= set(SKIP_REASONS)


def test_every_damaged_row_is_skipped_with_its_reason_and_the_rest_loads(datasets):
    good, bad = datasets
    ds_bad, ds_good = AnyWordDataset(cfg(bad)), AnyWordDataset(cfg(good))
    assert len(ds_bad) == N
    got = {}
    for i in range(N):
        x = ds_bad[i]
        if isinstance(x, SkipRecord):
            got[i] = x.reason
            assert x.index == i and x.detail and x.source.endswith(f"row {i}")
        else:
            ref = ds_good[i]  # the intact rows give exactly what the undamaged dataset gives
            for k, v in x.items():
                assert np.array_equal(v, ref[k]) if isinstance(v, np.ndarray) else v == ref[k], (i, k)
    assert got == DAMAGE
    assert ds_bad.load_stats.malformed == Counter(
        {r: n for r, n in EXPECTED.items() if r in ("malformed_row", "bad_field_type")})


def test_skip_details_say_what_is_wrong(datasets):
    ds = AnyWordDataset(cfg(datasets[1]))
    assert "000001.jpg" in ds[1].detail
    assert "U+10FFFD" in ds[14].detail
    assert "8 x 8" in ds[15].detail and "4000 x 100" in ds[16].detail
    assert "no text" in ds[4].detail and "text is a int" in ds[6].detail


def test_collate_counts_are_exact(datasets):
    ds = AnyWordDataset(cfg(datasets[1]))
    collate = AnyWordCollate.for_dataset(ds)
    total, kept = Counter(), 0
    for start in range(0, N, 5):
        b = collate([ds[i] for i in range(start, min(start + 5, N))])
        total.update(b["skipped"])
        kept += len(b["texts"])
        assert b["glyphs"].shape[0] == len(b["texts"]) == b["n_lines"].shape[0]
    assert total == EXPECTED and kept == N - len(DAMAGE)


def test_loader_runs_through_with_counts_and_stops_past_the_skip_rate(datasets, caplog):
    ds = AnyWordDataset(cfg(datasets[1], max_skip_rate=1.0))
    loader = make_dataloader(ds, 4, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="anytext2_lcm.data.collate"):
        kept = sum(len(b["texts"]) for b in loader)
    assert kept == N - len(DAMAGE)
    assert loader.monitor.counts == EXPECTED and loader.monitor.seen == N
    assert "skipped sample" in caplog.text  # never silent
    assert loader.state_dict()["skips"] == {"seen": N, "counts": dict(EXPECTED)}

    strict = make_dataloader(AnyWordDataset(cfg(datasets[1], max_skip_rate=0.05)), 4, num_workers=0)
    with pytest.raises(TooManySkipsError) as err:
        for _ in strict:
            pass
    msg = str(err.value)
    assert "max_skip_rate 5.0%" in msg and "validate-data" in msg
    assert any(reason in msg for reason in EXPECTED)


def test_unexpected_errors_become_counted_skips(datasets, monkeypatch, caplog):
    import anytext2_lcm.data.anyword as anyword

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(anyword, "random_position_mask", boom)
    ds = AnyWordDataset(cfg(datasets[0]))
    with caplog.at_level(logging.WARNING):
        x = ds[0]
    assert isinstance(x, SkipRecord) and x.reason == "processing_error" and "simulated bug" in x.detail
    assert "Traceback" in caplog.text


def test_validation_report_counts_are_exact(datasets):
    good, bad = datasets
    rep = validate_files([bad], cfg(bad))
    assert rep.skipped == EXPECTED and rep.samples == N and rep.usable == N - len(DAMAGE)
    assert rep.ok  # damaged rows do not make the file unusable
    text = format_report(rep)
    for reason, n in EXPECTED.items():
        assert f"{reason:<20} {n}" in text
    assert "'\\U0010fffd' (U+10FFFD) x2" in text
    full = validate_files([bad], cfg(bad), full=True)
    assert full.skipped == EXPECTED
    clean = validate_files([good], cfg(good))
    assert clean.n_skipped == 0 and clean.usable == N


def test_validate_data_command_exit_status(datasets, tmp_path, capsys):
    good, bad = datasets
    assert main(["validate-data", "--image-size", str(S), bad]) == 0
    out = capsys.readouterr().out
    assert f"skipped: {len(DAMAGE)}" in out and "image_missing" in out
    assert main(["validate-data", "--image-size", str(S), "--max-skip-rate", "0.1", bad]) == 1
    broken = tmp_path / "broken.json"
    broken.write_text('{"data_root": "x",\n "data_list": [\n  {"img_name": "a.jpg",\n')
    assert main(["validate-data", "--image-size", str(S), good, str(broken)]) == 1
    out = capsys.readouterr().out
    assert "UNUSABLE" in out and "broken.json: not valid JSON at line 4" in out
    assert f"ok        {good}" in out
