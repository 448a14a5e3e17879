"""The AnyWord reader: the original's per-item processing, determinism, batches in the teacher's format, loading."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from anytext2_lcm.conditioning import TextInfo
from anytext2_lcm.config import ConfigError
from anytext2_lcm.data import glyphs as G
from anytext2_lcm.data.anyword import AnyWordDataset, DataConfig
from anytext2_lcm.data.collate import AnyWordCollate, EpochSampler, make_dataloader
from anytext2_lcm.data.fonts import FontNotFoundError, FontSpec, find_default_font, system_font_files
from anytext2_lcm.data.skips import DataFileError, SkipRecord

S = 256  # small training size keeps these tests fast; the processing does not depend on it


@pytest.fixture(scope="module")
def font() -> FontSpec:
    try:
        return find_default_font()
    except FontNotFoundError as e:
        pytest.skip(f"no CJK-capable system font: {e}")


@pytest.fixture(scope="module")
def synth(tmp_path_factory, font) -> str:
    from anytext2_lcm.data.synthetic import SynthConfig, write_dataset

    out = tmp_path_factory.mktemp("synth")
    (path,) = write_dataset(SynthConfig(num=12, size=S, seed=3), out)
    return str(path)


def cfg(paths, **kw) -> DataConfig:
    kw.setdefault("image_size", S)
    return DataConfig(json_paths=tuple(paths) if isinstance(paths, (list, tuple)) else (paths,), **kw)


def write_rows(folder, rows, name="data.json", image_size=(S, S), images=None):
    """A JSON file plus plain grey images for the rows that name one (unless given)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    for r in rows:
        if isinstance(r, dict) and isinstance(r.get("img_name"), str) and not (folder / "img" / r["img_name"]).exists():
            arr = images.get(r["img_name"]) if images else None
            if arr is None:
                arr = np.full((image_size[1], image_size[0], 3), 128, np.uint8)
                arr[10:-10:7] = 30  # some texture for the font hints
            Image.fromarray(arr).save(folder / "img" / r["img_name"])
    p = folder / name
    p.write_text(json.dumps({"data_root": "img", "data_list": rows}, ensure_ascii=False))
    return str(p)


def box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def line(text, poly, lang="Latin", **kw):
    return {"polygon": poly, "text": text, "language": lang, **kw}


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [({"image_size": 500}, "image_size"), ({"max_lines": 0}, "max_lines"),
                                      ({"mask_img_prob": 1.5}, "mask_img_prob"), ({"seed": -1}, "seed"),
                                      ({"font_hint_area": (0.9, 0.5)}, "font_hint_area"),
                                      ({"rand_font": True}, "rand_font"), ({"glyph_scale": 3}, "glyph_scale"),
                                      ({"max_skip_rate": -0.1}, "max_skip_rate")])
def test_config_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"data\.{field}="):
        DataConfig(json_paths=("x.json",), **kw)


def test_dataset_needs_files(tmp_path):
    with pytest.raises(ConfigError, match="json_paths"):
        AnyWordDataset(DataConfig())
    with pytest.raises(FileNotFoundError, match="nope.json"):
        AnyWordDataset(cfg(str(tmp_path / "nope.json")))


# ---------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------


def test_sample_fields_shapes_and_ranges(synth):
    ds = AnyWordDataset(cfg(synth))
    raw = json.load(open(synth))["data_list"]
    assert len(ds) == len(raw)
    for i in range(len(ds)):
        x = ds[i]
        assert isinstance(x, dict), x
        n_valid = sum(a.get("valid", True) for a in raw[i]["annotations"])
        n = x["n_lines"]
        assert n == min(n_valid, 5) and 1 <= n <= 5
        assert x["img"].shape == (S, S, 3) and x["img"].dtype == np.uint8
        assert x["glyphs"].shape == (5, 3, S, S) and x["positions"].shape == (5, S, S)
        assert x["gly_line"].shape == (5, 80, 512) and x["colors"].shape == (5, 3)
        for key in ("positions", "gly_line", "inv_mask", "hint", "font_hint", "edit_mask"):
            assert x[key].max() <= 1, key
        assert all(x["glyphs"][j].any() and x["gly_line"][j].any() and x["positions"][j].any() for j in range(n))
        assert not x["glyphs"][n:].any() and not x["positions"][n:].any() and not x["gly_line"][n:].any()
        assert x["texts"][n:] == [" "] * (5 - n) and x["language"][n:] == [" "] * (5 - n)
        assert (x["colors"][n:] == 500).all()
        assert x["text_caption"].endswith(" , ".join(["*"] * n) + " . ")
        assert any(x["text_caption"].startswith(p) for p in G.TEXT_CAPTION_PHRASES)
        assert "*" not in x["img_caption"]
        assert ("watermarks" in x["img_caption"]) == ("wm_score" in raw[i])
        np.testing.assert_array_equal(x["hint"], x["positions"][:n].max(0))


def test_glyph_and_line_images_are_the_renderers(synth, font):
    ds = AnyWordDataset(cfg(synth, mask_img_prob=0.0))
    raw = json.load(open(synth))["data_list"]
    x = ds[0]
    anns = [a for a in raw[0]["annotations"] if a.get("valid", True)]
    for j in range(x["n_lines"]):
        a = next(a for a in anns if a["text"][:20] == x["texts"][j])
        color = a.get("color", [500, 500, 500])
        np.testing.assert_allclose(x["colors"][j], color)
        np.testing.assert_array_equal(x["gly_line"][j], G.render_line_u8(x["texts"][j], font))
        ref = G.render_in_polygon_u8(x["texts"][j], a["polygon"], font, color, S, S)
        np.testing.assert_array_equal(x["glyphs"][j], ref.transpose(2, 0, 1))


def test_same_seed_epoch_index_gives_the_same_sample_whatever_came_before(synth):
    a = AnyWordDataset(cfg(synth, seed=5))
    b = AnyWordDataset(cfg(synth, seed=5))
    for i in (3, 0, 7):
        b[(0, (i + 1) % len(b))]  # other work in between must not matter
        xa, xb = a[(0, i)], b[(0, i)]
        for k, v in xa.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(v, xb[k], err_msg=k)
            else:
                assert v == xb[k], k
    a.set_epoch(0)
    assert a[3]["text_caption"] == b[(0, 3)]["text_caption"]
    differs = [not np.array_equal(a[(0, i)]["positions"], a[(1, i)]["positions"])
               or a[(0, i)]["text_caption"] != a[(1, i)]["text_caption"] for i in range(len(a))]
    assert any(differs)  # a new epoch draws new augmentations


def test_more_lines_than_slots_are_sampled_and_the_rest_loss_masked(tmp_path):
    lines = [line(f"w{k}", box(10 + 20 * k, 20 + 30 * k, 40 + 20 * k, 40 + 30 * k)) for k in range(7)]
    path = write_rows(tmp_path, [{"img_name": "a.png", "caption": "c", "annotations": lines}])
    ds = AnyWordDataset(cfg(path, max_lines=3, mask_img_prob=0.0))
    x = ds[0]
    assert x["n_lines"] == 3 and len(set(x["texts"])) == 3 and set(x["texts"]) <= {f"w{k}" for k in range(7)}
    unsel = [k for k in range(7) if f"w{k}" not in x["texts"]]
    expected = np.zeros((S, S), np.uint8)
    for k in unsel:
        expected |= G.polygon_mask_u8(lines[k]["polygon"], S, S)
    np.testing.assert_array_equal(x["inv_mask"], expected)
    orders = {tuple(ds[(e, 0)]["texts"]) for e in range(12)}
    assert len(orders) > 3  # the subset and its order are random, as random.sample


def test_invalid_lines_go_to_inv_mask_and_editing_clears_it(tmp_path):
    rows = [{"img_name": "a.png", "annotations": [line("keep", box(20, 20, 200, 60)),
                                                  {"polygon": box(30, 150, 120, 190), "valid": False}]}]
    path = write_rows(tmp_path, rows)
    gen = AnyWordDataset(cfg(path, mask_img_prob=0.0))[0]
    np.testing.assert_array_equal(gen["inv_mask"], G.polygon_mask_u8(box(30, 150, 120, 190), S, S))
    assert gen["edit_mask"].all()
    edit = AnyWordDataset(cfg(path, mask_img_prob=1.0))[0]
    assert not edit["inv_mask"].any()
    np.testing.assert_array_equal(edit["edit_mask"], edit["hint"])
    batch = AnyWordCollate(S, 5)([gen, edit])
    assert (batch["masked_img"][0] == -1).all()
    m = batch["masked_img"][1]
    hint = batch["hint"][1, 0].bool()
    assert (m[:, hint] == -1).all()
    torch.testing.assert_close(m[:, ~hint], batch["img"][1][:, ~hint], rtol=0, atol=0)


def test_image_without_text_gets_the_originals_space_line(tmp_path):
    path = write_rows(tmp_path, [{"img_name": "a.png", "caption": "nothing written",
                                  "annotations": [{"polygon": box(50, 50, 90, 90), "valid": False}]},
                                 {"img_name": "b.png"}])
    ds = AnyWordDataset(cfg(path, mask_img_prob=0.0))
    for x in (ds[0], ds[1]):
        assert x["n_lines"] == 1 and x["texts"] == [" "] * 5 and x["language"][0] == "Latin"
        assert not x["glyphs"].any() and not x["gly_line"].any()
        assert x["text_caption"].endswith("* . ") and x["text_caption"].count("*") == 1
        assert x["positions"][0][10:100, 10:100].mean() > 0.9 and x["positions"][0].sum() < 1.1 * 91 * 91
        assert (x["colors"] == 500).all()
    assert ds[0]["inv_mask"][50:90, 50:90].all() and not ds[1]["inv_mask"].any()


def test_texts_cut_to_max_chars_and_colors_default(tmp_path):
    path = write_rows(tmp_path, [{"img_name": "a.png", "annotations": [
        line("abcdefghijklmnopqrstuvwxyz", box(10, 10, 240, 50), color=[10, 200, 30]),
        line("Chinese 中文", box(10, 100, 240, 140), lang="Chinese")]}])
    x = AnyWordDataset(cfg(path, max_chars=8))[0]
    assert sorted(x["texts"][:2]) == ["Chinese ", "abcdefgh"]
    j = x["texts"].index("abcdefgh")
    np.testing.assert_allclose(x["colors"][j], [10, 200, 30])
    np.testing.assert_allclose(x["colors"][1 - j], [500, 500, 500])


def test_polygons_follow_an_image_that_is_resized(tmp_path):
    img = np.full((300, 600, 3), 200, np.uint8)
    path = write_rows(tmp_path, [{"img_name": "a.png", "annotations": [line("wide", box(300, 150, 580, 290))]}],
                      images={"a.png": img})
    x = AnyWordDataset(cfg(path, mask_img_prob=0.0, mask_pos_prob=1.0))[0]
    ys, xs = np.nonzero(G.polygon_mask_u8(box(128, 128, 247.5, 247.5), S, S))
    pos = x["positions"][0]
    assert pos[ys, xs].mean() > 0.9 and pos.sum() < 1.15 * len(ys)


def test_watermark_rows_dropped_and_long_captions_truncated(tmp_path):
    long_caption = ". ".join(f"sentence {i} is here" for i in range(100))
    path = write_rows(tmp_path, [{"img_name": "a.png", "wm_score": 0.9, "annotations": []},
                                 {"img_name": "b.png", "wm_score": 0.2, "caption": long_caption,
                                  "annotations": []}])
    ds = AnyWordDataset(cfg(path, wm_thresh=0.5, trunc_cap=20))
    assert len(ds) == 1 and ds.load_stats.filtered_watermark == 1
    cap = ds[0]["img_caption"]
    assert cap.startswith("sentence 0 is here") and len(cap.split()) <= 21
    assert len(AnyWordDataset(cfg(path, wm_thresh=1.0))) == 2


def test_several_files_are_concatenated(synth, tmp_path):
    other = write_rows(tmp_path, [{"img_name": "a.png", "annotations": [line("x", box(5, 5, 100, 40))]}])
    ds = AnyWordDataset(cfg([synth, other]))
    assert len(ds) == 13 and ds[12]["texts"][0] == "x"
    assert ds.load_stats.per_file == {synth: 12, other: 1}


def test_random_fonts_per_language(tmp_path, font):
    latin = next((p for p in system_font_files() if p.endswith("DejaVuSans.ttf")), None)
    if latin is None:
        pytest.skip("DejaVu Sans is not installed")
    fdir = tmp_path / "fonts"
    (fdir / "Latin").mkdir(parents=True)
    (fdir / "Chinese").mkdir()
    (fdir / "Latin" / "dejavu.ttf").symlink_to(latin)
    (fdir / "Chinese" / ("cjk" + os.path.splitext(font.path)[1])).symlink_to(font.path)
    path = write_rows(tmp_path / "d", [{"img_name": "a.png", "annotations": [
        line("Hello", box(10, 10, 240, 50)), line("你好", box(10, 100, 240, 140), lang="Chinese")]}])
    ds = AnyWordDataset(cfg(path, font_dir=str(fdir), font=f"{font.path}#{font.index}", rand_font=True))
    x = ds[0]
    j = x["texts"].index("Hello")
    np.testing.assert_array_equal(x["gly_line"][j], G.render_line_u8("Hello", FontSpec(latin)))
    np.testing.assert_array_equal(x["gly_line"][1 - j], G.render_line_u8("你好", FontSpec(font.path, font.index)))


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def test_invalid_json_names_the_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"data_root": "img",\n "data_list": [\n {"img_name": "a.png", "caption": "x"\n ]}')
    with pytest.raises(DataFileError, match=r"broken\.json: not valid JSON at line 4"):
        AnyWordDataset(cfg(str(p)))
    q = tmp_path / "wrong.json"
    q.write_text('{"rows": []}')
    with pytest.raises(DataFileError, match=r"wrong\.json: expected an object with a \"data_list\""):
        AnyWordDataset(cfg(str(q)))


# ---------------------------------------------------------------------------------------------------------------
# Batches: exactly the teacher's interface
# ---------------------------------------------------------------------------------------------------------------


def test_batch_has_the_documented_names_shapes_dtypes_and_ranges(synth):
    ds = AnyWordDataset(cfg(synth, mask_img_prob=0.5))
    items = [ds[i] for i in range(4)] + [SkipRecord(99, "image_missing", "x.jpg")]
    b = AnyWordCollate.for_dataset(ds)(items)
    B, L = 4, 5
    expected = {  # conditioning.py module docstring + the data-batch extras it lists
        "glyphs": (B, L, 3, S, S), "positions": (B, L, 1, S, S), "gly_line": (B, L, 1, 80, 512),
        "colors": (B, L, 3), "n_lines": (B,), "font_hint": (B, 1, S, S), "img": (B, 3, S, S),
        "masked_img": (B, 3, S, S), "inv_mask": (B, 1, S, S), "hint": (B, 1, S, S),
    }
    for k, shape in expected.items():
        assert tuple(b[k].shape) == shape, k
        assert b[k].dtype == (torch.long if k == "n_lines" else torch.float32), k
        assert b[k].is_contiguous(), k
    for k in ("positions", "gly_line", "font_hint", "inv_mask", "hint"):
        assert set(torch.unique(b[k]).tolist()) <= {0.0, 1.0}, k
    assert 0 <= b["glyphs"].min() and b["glyphs"].max() <= 1 and b["glyphs"].max() > 0.9
    assert -1 <= b["img"].min() and b["img"].max() <= 1
    assert b["colors"].max() <= 500 / 255 + 1e-6
    for i in range(B):  # padding slots: colour "unspecified"
        n = int(b["n_lines"][i])
        torch.testing.assert_close(b["colors"][i, n:], torch.full((L - n, 3), 500 / 255))
    for k in ("img_caption", "text_caption"):
        assert isinstance(b[k], list) and len(b[k]) == B and all(isinstance(s, str) for s in b[k])
    assert all(len(t) == L for t in b["texts"]) and all(len(t) == L for t in b["language"])
    assert b["skipped"] == {"image_missing": 1} and len(b["skip_records"]) == 1
    for i in range(B):
        assert b["text_caption"][i].count("*") == int(b["n_lines"][i])
    info = TextInfo.from_batch(b, masked_x=torch.zeros(B, 4, S // 8, S // 8))  # the teacher's own validation
    assert info.max_lines == L and len(info.lines()) == int(b["n_lines"].sum())


def test_compact_batches_expand_to_exactly_the_float_batch(synth):
    from anytext2_lcm.data.collate import expand_batch

    ds = AnyWordDataset(cfg(synth, mask_img_prob=0.5))
    items = [ds[i] for i in range(3)]
    full = AnyWordCollate.for_dataset(ds)(items)
    compact = AnyWordCollate.for_dataset(ds, compact=True)(items)
    assert compact["glyphs"].dtype == torch.uint8 and "masked_img" not in compact
    assert compact["glyphs"].nbytes * 4 == full["glyphs"].nbytes
    expanded = expand_batch(compact, device="cpu")
    assert set(expanded) == set(full)
    for k, v in full.items():
        if torch.is_tensor(v):
            assert expanded[k].dtype == v.dtype and torch.equal(expanded[k], v), k
        else:
            assert expanded[k] == v, k


def test_batch_of_only_skips_is_empty_but_well_formed():
    b = AnyWordCollate(S, 5)([SkipRecord(0, "empty_text", "x"), SkipRecord(1, "empty_text", "y")])
    assert b["glyphs"].shape == (0, 5, 3, S, S) and b["n_lines"].shape == (0,)
    assert b["skipped"] == {"empty_text": 2} and b["texts"] == []


def test_glyph_scale_two(synth):
    ds = AnyWordDataset(cfg(synth, glyph_scale=2))
    b = AnyWordCollate.for_dataset(ds)([ds[0]])
    assert b["glyphs"].shape == (1, 5, 3, 2 * S, 2 * S) and b["positions"].shape == (1, 5, 1, S, S)


# ---------------------------------------------------------------------------------------------------------------
# Loading: workers, resume, file handles
# ---------------------------------------------------------------------------------------------------------------


def _digest(batches):
    return [(tuple(tuple(t) for t in b["texts"]), float(b["glyphs"].sum()), float(b["positions"].sum()),
             float(b["font_hint"].sum()), tuple(b["text_caption"])) for b in batches]


def test_batches_do_not_depend_on_workers_and_resume_exactly(synth):
    import cv2

    # The parent has used OpenCV's thread pool: forked workers must not deadlock on it (regression).
    cv2.GaussianBlur(np.random.rand(1500, 1500).astype(np.float32), (0, 0), 3)
    ds = AnyWordDataset(cfg(synth, seed=11))
    ref = _digest(make_dataloader(ds, 3, num_workers=0))
    assert _digest(make_dataloader(ds, 3, num_workers=2)) == ref
    loader = make_dataloader(ds, 3, num_workers=0)
    it = iter(loader)
    first = [next(it), next(it)]
    state = loader.state_dict()
    assert state["position"] == 6 and state["epoch"] == 0
    resumed = make_dataloader(ds, 3, num_workers=0)
    resumed.load_state_dict(state)
    assert _digest(first) + _digest(resumed) == ref
    resumed.set_epoch(1)
    assert _digest(resumed) != ref  # another order and other augmentations


def test_sampler_shards_ranks_disjointly():
    parts = [list(EpochSampler(10, seed=1, rank=r, world_size=3)) for r in range(3)]
    seen = [i for p in parts for _, i in p]
    assert all(len(p) == 4 for p in parts) and set(seen) == set(range(10))
    assert list(EpochSampler(5, shuffle=False, start=2)) == [(0, 2), (0, 3), (0, 4)]


def test_no_file_handles_leak(synth):
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    ds = AnyWordDataset(cfg(synth))
    for i in range(len(ds)):
        ds[(0, i)]
    before = len(os.listdir(fd_dir))
    for e in range(1, 4):
        for i in range(len(ds)):
            assert isinstance(ds[(e, i)], dict)
    assert len(os.listdir(fd_dir)) == before


def test_a_loader_batch_runs_through_the_tiny_teacher(tmp_path):
    """End to end on the real model code: masked_x, line embeddings, prompts with placeholders, WriteNet, UNet."""
    from anytext2_lcm.config import preset
    from anytext2_lcm.data.synthetic import SynthConfig, write_dataset
    from anytext2_lcm.models.anytext2 import AnyText2

    (path,) = write_dataset(SynthConfig(num=3, size=128, seed=0), tmp_path)
    ds = AnyWordDataset(DataConfig(json_paths=(str(path),), image_size=128, mask_img_prob=0.5))
    batch = next(iter(make_dataloader(ds, 3, num_workers=0)))
    torch.manual_seed(0)
    model = AnyText2(preset("tiny")).eval()
    with torch.no_grad():
        masked_x = model.encode_masked(batch["masked_img"])
        info = TextInfo.from_batch(batch, masked_x)
        lines = model.line_embeddings(info)
        cond = model.encode_conditions(batch["img_caption"], batch["text_caption"], lines)
        control = model.control(cond.text_context, info)
        eps = model.denoise(torch.randn_like(masked_x), torch.tensor([1, 500, 999]), cond.image_context, control)
    assert [len(x) for x in lines] == batch["n_lines"].tolist()
    assert eps.shape == masked_x.shape == (3, 4, 16, 16) and torch.isfinite(eps).all()


class _FdReportingDataset(AnyWordDataset):
    """Reports, with each sample, the worker that made it and how many files that process has open."""

    def __getitem__(self, key):
        from torch.utils.data import get_worker_info

        x = super().__getitem__(key)
        assert isinstance(x, dict), x
        return get_worker_info().id, len(os.listdir("/dev/fd"))


def test_workers_open_fonts_once_and_leak_no_file_handles(synth):
    from torch.utils.data import DataLoader

    from anytext2_lcm.data.collate import worker_init

    ds = _FdReportingDataset(cfg(synth))
    sampler = EpochSampler(len(ds), shuffle=True)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, worker_init_fn=worker_init,
                        persistent_workers=True, collate_fn=lambda items: items)
    per_epoch = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        counts: dict[int, int] = {}
        for items in loader:
            for worker, n in items:
                counts[worker] = max(counts.get(worker, 0), n)
        per_epoch.append(counts)
    assert set(per_epoch[0]) == {0, 1}
    assert per_epoch[-1] == per_epoch[1]  # after the first epoch (fonts loaded) the open-file count stays put
