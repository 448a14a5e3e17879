"""The web UI without a browser: widget values → requests (lines, positions, fonts, colours, editing), readable
messages for bad input, the compare plan, the engine's three model choices on one network, and the Gradio handlers
and app (built, not served)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from anytext2_lcm import lora as L
from anytext2_lcm.data.fonts import FontSpec, system_font_files
from anytext2_lcm.generation import GenerationRequest, Generator, InputError
from anytext2_lcm.ui import inputs as I
from anytext2_lcm.ui.engine import Engine
from model_helpers import trained_like_tiny

S = 128  # image side in these tests


def boxes_mask(*boxes, size=S, value=255) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = value
    return m


def strokes(*boxes, size=S, rgb=(255, 255, 255)) -> dict:
    """An ImageEditor value: black background, one RGBA layer with the boxes painted (alpha 255)."""
    layer = np.zeros((size, size, 4), np.uint8)
    for x0, y0, x1, y1 in boxes:
        layer[y0:y1, x0:x1, :3] = rgb
        layer[y0:y1, x0:x1, 3] = 255
    bg = np.zeros((size, size, 4), np.uint8)
    bg[..., 3] = 255
    return {"background": bg, "layers": [layer], "composite": None}


TOP, BOTTOM, MIDDLE = (8, 8, 120, 40), (8, 80, 120, 112), (8, 50, 120, 70)


def ui(**kw) -> I.UiInputs:
    base = dict(prompt='a sign that says "Hi" and "Yo"', drawn=strokes(TOP, BOTTOM), width=S, height=S, steps=2)
    base.update(kw)
    return I.UiInputs(**base)


def latin_only_font() -> str | None:
    """A system font with Latin letters but no CJK (DejaVu Sans, Liberation, ...), if there is one."""
    for f in system_font_files():
        try:
            spec = FontSpec.parse(f)
            if spec.covers("Hello") and not spec.covers("世"):
                return f
        except Exception:  # noqa: BLE001 - unreadable font files are simply not candidates
            continue
    return None


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------


def test_font_choices_none_first_and_duplicate_names_get_their_folder():
    files = ["/a/x/Sans.ttf", "/a/y/Sans.ttf", "/b/Serif.otf"]
    ch = I.font_choices(files)
    assert ch[:2] == [(I.NO_FONT, I.NO_FONT), (I.MIMIC, I.MIMIC)]
    assert ch[2:] == [("Sans.ttf (x)", "/a/x/Sans.ttf"), ("Sans.ttf (y)", "/a/y/Sans.ttf"),
                      ("Serif.otf", "/b/Serif.otf")]
    assert len({label for label, _ in ch}) == len(ch)
    assert I.font_choices()[0] == (I.NO_FONT, I.NO_FONT)  # the system's list works too


@pytest.mark.parametrize("value, rgb", [
    ("#ff0000", (255, 0, 0)), ("#0f0", (0, 255, 0)), ("rgb(0, 128, 255)", (0, 128, 255)),
    ("rgba(10.4, 20.6, 30, 0.5)", (10, 21, 30)), ("red", (255, 0, 0)), ((1, 2, 3), (1, 2, 3)),
    ([0.0, 255.0, 7.2], (0, 255, 7))])
def test_parse_color_accepts_what_colour_pickers_send(value, rgb):
    assert I.parse_color(value) == rgb


@pytest.mark.parametrize("value", ["not a colour", "#12345", (300, 0, 0), (1, 2), None, "rgb(a, b, c)"])
def test_parse_color_rejects_with_a_message(value):
    with pytest.raises(InputError, match="colour"):
        I.parse_color(value)


def test_line_styles_none_font_and_unchecked_colour_are_unspecified():
    st = I.line_styles(["none", "/f/A.ttf", None], [False, True, True], ["#ff0000", "#00ff00", "rgb(1,2,3)"])
    assert st == [I.LineStyle(None, None), I.LineStyle("/f/A.ttf", (0, 255, 0)), I.LineStyle(None, (1, 2, 3))]
    with pytest.raises(InputError, match="line 2: colour is switched on but no colour"):
        I.line_styles(["none", "none"], [False, True], ["#000000", ""])


def test_masks_from_strokes_and_uploads():
    m = I.mask_from_strokes(strokes(TOP))
    assert m.dtype == np.uint8 and m.shape == (S, S)
    assert m[8:40, 8:120].min() == 255 and m.sum() == 255 * 32 * 112
    # a coloured brush counts the same: the layer's alpha decides
    assert np.array_equal(I.mask_from_strokes(strokes(TOP, rgb=(255, 0, 255))), m)
    # no strokes: an all-black mask of the canvas size; nothing at all: None
    empty = I.mask_from_strokes({"background": np.zeros((S, S, 4), np.uint8), "layers": [], "composite": None})
    assert empty.shape == (S, S) and not empty.any()
    assert I.mask_from_strokes(None) is None
    # uploads: grey, RGB, RGBA (transparent = black); anything <= 127 is black
    up = I.mask_from_image(np.stack([boxes_mask(TOP)] * 3, -1))
    assert np.array_equal(up, m)
    assert np.array_equal(I.mask_from_image(boxes_mask(TOP, value=200)), m)
    assert not I.mask_from_image(boxes_mask(TOP, value=100)).any()
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[..., :3] = 255
    assert not I.mask_from_image(rgba).any()
    assert I.mask_from_image(None) is None


def test_generation_request_from_the_widgets():
    req, notes = I.build_request(ui(styles=[I.LineStyle(None, (255, 0, 0)), I.LineStyle(None, None)],
                                    sampler="lcm", steps=4, cfg_scale=1.0, seed=7, strength=0.8, num_images=2))
    assert isinstance(req, GenerationRequest) and notes == []
    assert req.mask.shape == (S, S) and req.positions is None and req.edit_image is None
    assert (req.height, req.width) == (S, S)
    assert req.colors == [(255, 0, 0), None] and req.fonts == [None, None]
    assert (req.sampler, req.steps, req.cfg_scale, req.seed, req.strength, req.num_images) == ("lcm", 4, 1.0, 7, 0.8, 2)
    assert req.sort == "vertical"


def test_drawn_and_uploaded_positions_add_up_and_are_resized():
    # one region drawn on a 256 canvas, the other uploaded at 64x64: both end up on the 128x128 request
    drawn = strokes((16, 16, 240, 80), size=256)
    up = boxes_mask((4, 40, 60, 56), size=64)
    req, _ = I.build_request(ui(drawn=drawn, uploaded_mask=up))
    assert req.mask.shape == (S, S)
    assert req.mask[8:40, 8:120].all() and req.mask[80:112, 8:120].all()
    from anytext2_lcm.data.glyphs import positions_from_mask

    assert len(positions_from_mask(req.mask)) == 2


def test_sort_order_is_passed_by_its_label():
    req, _ = I.build_request(ui(sort="left-right (horizontal)"))
    assert req.sort == "horizontal"


@pytest.mark.parametrize("kw, message", [
    (dict(prompt="   "), "Type a prompt first"),
    (dict(drawn=None), "position mask is empty"),
    (dict(drawn=strokes()), "position mask is empty"),
    (dict(drawn=strokes((0, 0, 3, 3))), "no region large enough"),
    (dict(prompt='"a" "b" "c"'), "3 quoted lines but only 2 positions"),
    (dict(drawn=strokes((8, 8, 120, 60), (8, 50, 120, 112))), "2 quoted lines but only 1 position"),
    (dict(width=100), "multiple of 64"),
    (dict(sampler="euler"), "unknown sampler"),
    (dict(steps=0), "steps"),
    (dict(cfg_scale=0), "CFG"),
    (dict(seed=-1), "seed"),
    (dict(mode="student"), "unknown model choice"),
    (dict(task=I.TASK_EDIT), "upload the image to edit"),
])
def test_bad_inputs_give_readable_messages(kw, message):
    with pytest.raises(InputError, match=message):
        I.build_request(ui(**kw))


def test_notes_for_unused_positions_and_styles():
    req, notes = I.build_request(ui(prompt='one "line"', styles=[I.LineStyle(), I.LineStyle(None, (1, 2, 3))]))
    assert any("2 positions but 1 quoted line" in n for n in notes)
    assert any("line 2" in n and "ignored" in n for n in notes)
    assert req.colors == [None]
    _, notes = I.build_request(ui(prompt="a plain photo", drawn=None))
    assert any("without text lines" in n for n in notes)


def test_font_without_a_glyph_is_named_with_its_line():
    font = latin_only_font()
    if font is None:
        pytest.skip("no Latin-only font on this system (e.g. DejaVu Sans) to check a missing CJK glyph")
    ok, _ = I.build_request(ui(prompt='say "Hi" and "Yo"', styles=[I.LineStyle(font), I.LineStyle()]))
    assert ok.fonts == [font, None]
    name = font.rsplit("/", 1)[-1]
    with pytest.raises(InputError, match=f'Line 2 "世界": the font {name} has no glyph for'):
        I.build_request(ui(prompt='say "Hi" and "世界"', styles=[I.LineStyle(None), I.LineStyle(font)]))
    # as glyph font (the UI's --font) it is rejected for the CJK line too
    with pytest.raises(InputError, match="glyph font"):
        I.build_request(ui(prompt='say "Hi" and "世界"', glyph_font=font))


def test_edit_request_uses_the_background_and_the_brushed_regions():
    img = np.full((300, 200, 4), 255, np.uint8)
    img[..., :3] = (10, 120, 240)
    layer = np.zeros((300, 200, 4), np.uint8)
    layer[40:100, 20:180] = (255, 0, 255, 255)
    layer[200:260, 20:180] = (255, 0, 255, 255)
    editor = {"background": img, "layers": [layer], "composite": None}
    req, notes = I.build_request(ui(task=I.TASK_EDIT, edit=editor, drawn=None, edit_max_side=192))
    assert req.edit_image.shape == (192, 128, 3)  # longest side 192, both multiples of 64
    assert req.edit_image[0, 0].tolist() == [10, 120, 240]
    assert req.mask.shape == (192, 128)
    assert notes == []
    # the strokes landed on the two text regions, scaled with the image
    assert req.mask[int(70 * 0.64), 64] == 255 and req.mask[int(230 * 0.64), 64] == 255 and req.mask[96, 64] == 0
    with pytest.raises(InputError, match="Editing rewrites text"):
        I.build_request(ui(task=I.TASK_EDIT, edit=editor, prompt="no quotes here"))
    with pytest.raises(InputError, match="brush over the text regions"):
        I.build_request(ui(task=I.TASK_EDIT, edit={"background": img, "layers": [], "composite": None}))


def test_editor_background_flattens_transparency_on_white():
    bg = np.zeros((4, 4, 4), np.uint8)
    bg[0, 0] = (0, 0, 0, 255)
    out = I.editor_background({"background": bg, "layers": []})
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [255, 255, 255]


def test_compare_plan_teacher_beside_student_steps_same_seed():
    req, _ = I.build_request(ui(seed=11, sampler="ddim", steps=20))
    plan = I.compare_plan(req, student_mode=I.MODE_MERGED, student_sampler="ddim")
    assert [p.mode for p in plan] == [I.MODE_TEACHER] + [I.MODE_MERGED] * 4
    t = plan[0].request
    assert (t.sampler, t.steps, t.cfg_scale) == ("ddim", 20, 7.5)
    assert [(p.request.sampler, p.request.steps, p.request.cfg_scale) for p in plan[1:]] == \
        [("lcm", n, 1.0) for n in (1, 2, 4, 8)]  # a DDIM choice falls back to LCM for the student
    assert all(p.request.seed == 11 and p.request.mask is req.mask and p.request.num_images == 1 for p in plan)
    assert "teacher" in plan[0].label and "4 steps" in plan[3].label
    assert I.compare_plan(req, student_mode=I.MODE_TEACHER, student_sampler="tcd")[1].mode == I.MODE_STUDENT
    assert I.compare_plan(req, student_sampler="tcd")[1].request.sampler == "tcd"


def test_mode_defaults():
    assert I.mode_defaults(I.MODE_TEACHER) == ("ddim", 20, 7.5)
    assert I.mode_defaults(I.MODE_STUDENT) == I.mode_defaults(I.MODE_MERGED) == ("lcm", 4, 1.0)
    with pytest.raises(InputError):
        I.mode_defaults("nope")


def test_format_seconds():
    assert I.format_seconds({"prepare": 0.01, "conditioning": 0.5, "denoise": 2.0, "decode": 0.25, "total": 2.76}) == \
        "2.76 s (conditioning 0.50, denoise 2.00, decode 0.25)"


# ---------------------------------------------------------------------------------------------------------------
# Engine: teacher / teacher + LoRA / merged student on one network
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_teacher_latents():
    """(model with a perturbed student LoRA, the teacher's latents for REQ computed before the LoRA existed)."""
    m = trained_like_tiny()
    base = Generator(m)(REQ).latents.clone()
    L.apply_lora(m, L.LoraSpec(rank=4, alpha=4))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval(), base


REQ = GenerationRequest(prompt='a sign "Hi"', positions=[[8, 8, 120, 40]], height=S, width=S, steps=2, seed=3)


def test_engine_modes_share_one_network(model_and_teacher_latents):
    m, base = model_and_teacher_latents
    n_params = sum(p.numel() for p in m.parameters())
    eng = Engine(m, model_name="tiny", lora_name="test-adapter")
    assert eng.modes == list(I.MODES) and eng.has_lora and not eng.merged
    teacher = eng.run(REQ, I.MODE_TEACHER)
    assert torch.equal(teacher.latents, base)  # the adapter is bypassed exactly
    student = eng.run(REQ, I.MODE_STUDENT)
    assert (student.latents - base).abs().max() > 1e-3
    merged = eng.run(REQ, I.MODE_MERGED)
    assert eng.merged
    torch.testing.assert_close(merged.latents, student.latents, atol=1e-4, rtol=1e-4)
    again = eng.run(REQ, I.MODE_TEACHER)  # unmerged again for the teacher
    assert not eng.merged
    torch.testing.assert_close(again.latents, base, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in m.parameters()) == n_params  # no second copy was made
    assert "test-adapter" in eng.describe() and "cpu" in eng.describe()


def test_engine_without_lora_offers_the_teacher_only():
    eng = Engine(trained_like_tiny(), model_name="tiny")
    assert eng.modes == [I.MODE_TEACHER] and not eng.has_lora
    with pytest.raises(InputError, match="--lora"):
        eng.run(REQ, I.MODE_STUDENT)
    res = eng.run(dataclasses.replace(REQ, steps=1), I.MODE_TEACHER)
    assert res.images[0].shape == (S, S, 3)
    assert eng.warmup(64) > 0


def test_engine_compare_runs_every_cell_with_the_same_seed(model_and_teacher_latents):
    m, base = model_and_teacher_latents
    eng = Engine(m, lora_name="x")
    plans = I.compare_plan(REQ, student_steps=(1, 2), teacher_steps=2)
    seen = []
    cells = eng.compare(plans, progress=lambda i, n, label: seen.append((i, n)))
    assert [c.label for c in cells] == [p.label for p in plans] and seen == [(0, 3), (1, 3), (2, 3)]
    direct = eng.run(plans[2].request, I.MODE_STUDENT)
    assert torch.equal(cells[2].result.latents, direct.latents)
    assert all(c.result.seconds["total"] > 0 for c in cells)


# ---------------------------------------------------------------------------------------------------------------
# Gradio handlers and app (no server)
# ---------------------------------------------------------------------------------------------------------------


def widget_values(**kw) -> tuple:
    from anytext2_lcm.ui.app import Handlers

    v = {"prompt": 'a sign that says "Hi" and "Yo"', "task": I.TASK_GENERATE, "canvas": strokes(TOP, BOTTOM),
         "editor": None, "mask": None, "sort": "top-down (vertical)", "mode": I.MODE_TEACHER, "sampler": "ddim",
         "steps": 2, "cfg": 7.5, "strength": 1.0, "seed": 0, "width": S, "height": S, "num_images": 1}
    for i in range(1, I.MAX_LINES + 1):
        v.update({f"font_{i}": I.NO_FONT, f"use_color_{i}": False, f"color_{i}": "#000000", f"mimic_{i}": None})
    v.update({"revise": False, "hollow": True, "show_debug": True, "base_model": "", "style_loras": ""})
    v.update(kw)
    return tuple(v[name] for name in Handlers.INPUT_NAMES)


def test_handlers_generate_compare_and_errors(model_and_teacher_latents):
    gr = pytest.importorskip("gradio", reason="gradio is part of the test extra: make setup")
    from anytext2_lcm.ui.app import Handlers

    m, _ = model_and_teacher_latents
    h = Handlers(Engine(m, lora_name="x"))
    gallery, info, glyphs, debug = h.generate(*widget_values(use_color_1=True, color_1="#ff0000"))
    assert [name for _, name in debug] == ["glyphs", "positions", "font_hint"]
    (img, caption), = gallery
    assert img.shape == (S, S, 3) and img.dtype == np.uint8 and img.std() > 0
    assert caption.startswith("seed 0 · ") and caption.endswith(" s")
    assert "teacher" in info and "DDIM 2 steps" in info and '"Hi", "Yo"' in info
    assert glyphs.shape == (S, S, 3) and glyphs[8:40, 8:120].max() > 0
    assert glyphs[8:40, 8:120, 0].sum() > glyphs[8:40, 8:120, 1].sum()  # the red line's glyphs are red

    cg, table = h.compare(*widget_values(mode=I.MODE_STUDENT, sampler="lcm"), student_steps=(1, 2), teacher_steps=2)
    assert len(cg) == 3 and all(c.endswith(" s") for _, c in cg)
    assert "| teacher · DDIM 2 steps · CFG 7.5 | teacher |" in table and "LCM 2 steps" in table

    with pytest.raises(gr.Error, match="position mask is empty") as e:
        h.generate(*widget_values(canvas=None))
    assert "Traceback" not in e.value.message
    with pytest.raises(gr.Error, match="3 quoted lines but only 2 positions"):
        h.generate(*widget_values(prompt='"a" "b" "c"'))
    with pytest.raises(gr.Error, match="needs a student LoRA"):
        Handlers(Engine(trained_like_tiny())).generate(*widget_values(mode=I.MODE_STUDENT))
    with pytest.raises(gr.Error, match="compare view needs a student"):
        Handlers(Engine(trained_like_tiny())).compare(*widget_values())
    # user text in a message is escaped (messages are shown as HTML)
    with pytest.raises(gr.Error) as e:
        h.generate(*widget_values(use_color_2=True, color_2="<b>bold</b>"))
    assert "&lt;b&gt;bold&lt;/b&gt;" in e.value.message and "<b>" not in e.value.message


def test_unexpected_failures_become_one_readable_line(model_and_teacher_latents, monkeypatch):
    gr = pytest.importorskip("gradio", reason="gradio is part of the test extra: make setup")
    from anytext2_lcm.ui.app import Handlers

    eng = Engine(model_and_teacher_latents[0], lora_name="x")

    def boom(*a, **k):
        raise RuntimeError("something deep\nwith a second line")

    monkeypatch.setattr(eng, "run", boom)
    with pytest.raises(gr.Error) as e:
        Handlers(eng).generate(*widget_values())
    assert e.value.message == ("Generation failed (RuntimeError: something deep). The server log has the details.")


def test_build_app_has_the_widgets_the_browser_test_uses(model_and_teacher_latents):
    gr = pytest.importorskip("gradio", reason="gradio is part of the test extra: make setup")
    from anytext2_lcm.ui.app import ELEM, build_app

    app = build_app(Engine(model_and_teacher_latents[0], lora_name="x"), default_size=128, font_files=[])
    assert isinstance(app, gr.Blocks)
    ids = {b.elem_id for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert set(ELEM.values()) <= ids
    assert {f"font_{i}" for i in range(1, 6)} | {f"color_{i}" for i in range(1, 6)} <= ids
    radios = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "model_mode"]
    assert [c[0] for c in radios[0].choices] == list(I.MODES)


def test_cli_lists_ui_without_importing_gradio():
    code = ("import sys; from anytext2_lcm.cli import build_parser; p = build_parser(); "
            "a = p.parse_args(['ui', '--port', '0', '--lora', 'x']); "
            "print('gradio' in sys.modules, a.model, a.host, a.port, a.lora)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "testbed", "127.0.0.1", "0", "x"]


def test_cli_ui_without_gradio_says_how_to_install(monkeypatch, capsys):
    from anytext2_lcm.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio → ModuleNotFoundError
    assert main(["ui", "--port", "0"]) == 2
    assert "pip install 'anytext2-lcm[ui]'" in capsys.readouterr().err


def test_cli_ui_busy_port_fails_before_loading_the_model(capsys):
    pytest.importorskip("gradio", reason="gradio is part of the test extra: make setup")
    import socket

    from anytext2_lcm.cli import main

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--port", str(port), "--model", "no/such/model"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pass another --port" in err


# ---------------------------------------------------------------------------------------------------------------
# The original demo's extras: mimic font, revise position, hollow font, debug, base model and style LoRAs
# ---------------------------------------------------------------------------------------------------------------


def photo_editor(brushed: bool = True) -> dict:
    """A "mimic from image" editor value: dark text on a light photo, the text brushed over (RGBA layer)."""
    from PIL import Image, ImageDraw, ImageFont

    from anytext2_lcm.data.fonts import find_default_font

    f = find_default_font()
    img = Image.new("RGBA", (200, 100), (230, 220, 200, 255))
    ImageDraw.Draw(img).text((20, 20), "Font", font=ImageFont.truetype(f.path, 44, index=f.index),
                             fill=(20, 30, 40, 255))
    layer = np.zeros((100, 200, 4), np.uint8)
    if brushed:
        layer[15:80, 15:150] = (255, 0, 255, 255)
    return {"background": np.asarray(img), "layers": [layer], "composite": None}


def test_line_styles_mimic_from_image_takes_the_editor_and_says_what_is_missing():
    st = I.line_styles([I.MIMIC, "none"], [False, False], ["#000000", "#000000"], [photo_editor(), None])
    image, mask = st[0].mimic
    assert st[0].font is None and image.shape == (100, 200, 3) and mask[15:80, 15:150].min() == 255
    assert mask.sum() == 255 * 65 * 135 and st[1].mimic is None
    with pytest.raises(InputError, match="line 1: 'mimic from image' is chosen: upload an image"):
        I.line_styles([I.MIMIC], [False], ["#000000"], [None])
    with pytest.raises(InputError, match="line 2: brush over the text"):
        I.line_styles(["none", I.MIMIC], [False, False], ["#000000"] * 2, [None, photo_editor(brushed=False)])
    req, _ = I.build_request(ui(styles=st, revise_position=True, hollow_font=False))
    assert req.mimic_fonts[0] is st[0].mimic and req.revise_position and not req.hollow_font


def test_parse_community_fields():
    from anytext2_lcm.lora.style import StyleLora

    assert I.parse_community("", "") == (None, ())
    assert I.parse_community(" /m/base.safetensors ", "a.safetensors:0.8\n\n/b c.pt:-1") == (
        "/m/base.safetensors", (StyleLora("a.safetensors", 0.8), StyleLora("/b c.pt", -1.0)))
    with pytest.raises(InputError, match="style LoRA 'a.safetensors': expected FILE:RATIO"):
        I.parse_community("", "a.safetensors")


def test_handlers_mimic_debug_and_a_style_lora_rebuild_the_engine(tmp_path):
    gr = pytest.importorskip("gradio", reason="gradio is part of the test extra: make setup")
    from test_community import write_style

    from anytext2_lcm.ui.app import Handlers

    eng = Engine.load("tiny")
    path, _ = write_style(eng.model, tmp_path / "style.safetensors")
    before = eng.model
    h = Handlers(eng)
    values = dict(font_2=I.MIMIC, mimic_2=photo_editor(), style_loras=f"{path}:0.5")
    gallery, info, _, debug = h.generate(*widget_values(**values))
    assert eng.model is not before and eng.community[1][0].ratio == 0.5 and "style" in eng.describe()
    assert f"style `{path}` × 0.5" in info
    shown = dict((name, img) for img, name in debug)
    assert set(shown) == {"glyphs", "positions", "font_hint", "mimic_line2"} and shown["mimic_line2"].max() == 255
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # a module of the style
    styled = eng.model.state_dict()[key].clone()
    _, _, _, nodebug = h.generate(*widget_values(**{**values, "style_loras": "", "show_debug": False}))
    assert eng.community == (None, ()) and nodebug == []
    plain = before.state_dict()[key]
    assert torch.equal(eng.model.state_dict()[key], plain) and not torch.equal(styled, plain)
    with pytest.raises(gr.Error, match="does not exist"):
        h.generate(*widget_values(base_model=str(tmp_path / "absent.safetensors")))
    with pytest.raises(gr.Error, match="a fixed model"):
        Handlers(Engine(trained_like_tiny())).generate(*widget_values(style_loras=f"{path}:1"))

