"""The Gradio app of ``anytext2-lcm ui``.

Left: the prompt, the task (generate / edit), the positions (a black canvas to draw white regions on, or an
uploaded white-on-black mask; in editing mode the image to edit with the regions brushed over it), the order of
the regions, a font and a colour per line, the model (teacher; teacher + student LoRA; merged student) and its
sampling settings. Right: the results with the seconds each took, the rendered glyphs, and a compare view (the
teacher's 20-step DDIM + CFG beside the student at 1/2/4/8 steps, same seed).

Everything that turns widget values into a request lives in :mod:`anytext2_lcm.ui.inputs` (no Gradio there);
this module only lays out the widgets and reports errors as readable ``gr.Error`` / ``gr.Warning`` messages.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from ..defaults import teacher_cfg
from ..generation import InputError
from . import inputs as I
from .engine import Engine

log = logging.getLogger(__name__)

ELEM = {  # element ids the browser test (and custom CSS) rely on
    "prompt": "prompt", "task": "task", "canvas": "positions_canvas", "edit": "edit_canvas",
    "mask": "mask_upload", "generate": "generate_btn", "compare": "compare_btn", "gallery": "result_gallery",
    "info": "result_info", "glyphs": "glyph_preview", "compare_gallery": "compare_gallery",
    "compare_info": "compare_info", "debug_gallery": "debug_gallery", "base_model": "base_model",
    "style_loras": "style_loras", "revise": "revise_position", "hollow": "hollow_font", "show_debug": "show_debug",
}

DEFAULT_PROMPT = 'a shop sign that says "Hello" and "World"'

CSS = """
#result_info, #compare_info { min-height: 2em; }
"""


def _canvas_value(width: int, height: int) -> dict:
    return {"background": I.blank_canvas(width, height), "layers": [], "composite": None}


def _html(e) -> str:
    """Messages are shown as HTML: escape what the user typed."""
    import html

    return html.escape(str(e), quote=False)


def _no_progress(*args, **kwargs) -> None:
    pass


def _friendly(e: BaseException) -> str:
    """A one-line message for an unexpected failure (the trace goes to the server log, not to the page)."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return "Out of GPU memory: use a smaller image size, fewer images or fewer steps."
    if isinstance(e, MemoryError):
        return "Out of memory: use a smaller image size, fewer images or fewer steps."
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"Generation failed ({type(e).__name__}: {text[:300]}). The server log has the details."


class Handlers:
    """The UI's event handlers, callable without a browser: each takes the widget values in the order of
    :attr:`INPUT_NAMES` (``progress`` is any callable ``progress(fraction, desc=...)``) and raises ``gr.Error``
    with a readable message for anything a person can fix."""

    INPUT_NAMES = ("prompt", "task", "canvas", "editor", "mask", "sort",
                   *(f"font_{i + 1}" for i in range(I.MAX_LINES)), *(f"use_color_{i + 1}" for i in range(I.MAX_LINES)),
                   *(f"color_{i + 1}" for i in range(I.MAX_LINES)),
                   "mode", "sampler", "steps", "cfg", "strength", "seed", "width", "height", "num_images",
                   *(f"mimic_{i + 1}" for i in range(I.MAX_LINES)), "revise", "hollow", "show_debug", "base_model",
                   "style_loras")

    def __init__(self, engine: Engine, edit_max_side: int = 512):
        self.engine = engine
        self.edit_max_side = int(edit_max_side)

    def collect(self, values: Sequence[Any]) -> I.UiInputs:
        if len(values) != len(self.INPUT_NAMES):
            raise ValueError(f"expected {len(self.INPUT_NAMES)} widget values, got {len(values)}")
        v = dict(zip(self.INPUT_NAMES, values))
        n = range(1, I.MAX_LINES + 1)
        styles = I.line_styles([v[f"font_{i}"] for i in n], [v[f"use_color_{i}"] for i in n],
                               [v[f"color_{i}"] for i in n], [v[f"mimic_{i}"] for i in n])
        return I.UiInputs(
            prompt=v["prompt"], task=v["task"], drawn=v["canvas"], uploaded_mask=v["mask"], edit=v["editor"],
            sort=v["sort"], styles=styles, mode=v["mode"], sampler=v["sampler"], steps=v["steps"], seed=v["seed"],
            cfg_scale=v["cfg"], strength=v["strength"], width=v["width"], height=v["height"],
            num_images=v["num_images"], edit_max_side=self.edit_max_side, glyph_font=self.engine.glyph_font,
            revise_position=bool(v["revise"]), hollow_font=bool(v["hollow"]))

    def community(self, values: Sequence[Any]) -> tuple:
        """(base model, style LoRAs) of the "your own models and styles" fields (syntax checked)."""
        v = dict(zip(self.INPUT_NAMES, values))
        return I.parse_community(v["base_model"], v["style_loras"])

    def prepare(self, values: Sequence[Any]):
        import gradio as gr

        try:
            ui = self.collect(values)
            req, notes = I.build_request(ui)
            community = self.community(values)
        except InputError as e:
            raise gr.Error(_html(e), print_exception=False) from None
        for n in notes:
            gr.Warning(_html(n))
        return ui, req, community

    def _call(self, fn, *args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except InputError as e:
            raise gr.Error(_html(e), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - shown as one readable line; the trace is logged
            log.exception("generation failed")
            raise gr.Error(_html(_friendly(e)), print_exception=False) from None

    def generate(self, *values, progress=_no_progress):
        """→ (gallery [(image, caption)], info markdown, glyph preview, debug gallery [(image, caption)])."""
        import gradio as gr

        ui, req, community = self.prepare(values)
        progress(0, desc="rendering the text lines")

        def on_step(i, t, x):
            progress((i + 1) / req.steps, desc=f"step {i + 1}/{req.steps}")

        res = self._call(self.engine.run, req, ui.mode, callback=on_step, community=community)
        for w in res.warnings:
            if " positions but " not in w:  # already said by build_request, in the UI's words
                gr.Warning(_html(w))
        total = res.seconds["total"]
        gallery = [(img, f"seed {req.seed}{f' #{i + 1}' if len(res.images) > 1 else ''} · {total:.2f} s")
                   for i, img in enumerate(res.images)]
        lines = ", ".join(f'"{t}"' for t in res.texts if t.strip()) or "(no text lines)"
        info = (f"**{ui.mode}** · {req.sampler.upper()} {req.steps} step{'s' if req.steps > 1 else ''} · "
                f"CFG {req.cfg_scale:g} · seed {req.seed} · {req.width}×{req.height}  \n"
                f"**{I.format_seconds(res.seconds)}**  \nlines: {lines}{_own_models(community)}")
        debug = [(img, name) for name, img in res.debug_images.items()] if values[self.INPUT_NAMES.index(
            "show_debug")] else []
        return gallery, info, res.glyph_preview, debug

    def compare(self, *values, progress=_no_progress, student_steps: Sequence[int] = I.STUDENT_STEPS,
                teacher_steps: int = I.TEACHER_STEPS):
        """→ (gallery [(image, caption with seconds)], markdown table)."""
        import gradio as gr

        if not self.engine.has_lora:
            raise gr.Error("The compare view needs a student: start the UI with --lora ADAPTER "
                           "(the distillation's adapter folder or .safetensors).", print_exception=False)
        ui, req, community = self.prepare(values)
        student_mode = ui.mode if ui.mode != I.MODE_TEACHER else I.MODE_STUDENT
        plans = I.compare_plan(req, student_mode=student_mode, student_sampler=ui.sampler,
                               student_steps=student_steps, teacher_steps=teacher_steps,
                               teacher_cfg=teacher_cfg(self.engine.model.cfg))

        def on_cell(i, n, label):
            progress(i / n, desc=label)

        cells = self._call(self.engine.compare, plans, progress=on_cell, community=community)
        gallery = [(c.result.images[0], f"{c.label} · {c.result.seconds['total']:.2f} s") for c in cells]
        rows = "\n".join(f"| {c.label} | {c.mode} | {c.result.seconds['total']:.2f} |" for c in cells)
        info = (f"Same inputs and seed {req.seed}; the student runs without CFG.\n\n"
                f"| run | model | seconds |\n|---|---|---|\n{rows}")
        return gallery, info


def _own_models(community: tuple) -> str:
    base, styles = community
    parts = ([f"base model `{_html(base)}`"] if base else []) + [f"style `{_html(s.path)}` × {s.ratio:g}" for s in styles]
    return ("  \n" + " · ".join(parts)) if parts else ""


def build_app(engine: Engine, *, default_size: int | None = None, font_files: Sequence[str] | None = None,
              edit_max_side: int | None = None, title: str = "AnyText2-LCM"):
    """The ``gradio.Blocks`` app around ``engine``.

    Args:
        engine: the model(s) to run.
        default_size: initial width and height (default: the model's own size, ``cfg.image_size``).
        font_files: fonts offered per line (default: the system's, ``system_font_files()``).
        edit_max_side: images to edit are shrunk to this longest side (default: 512 on the CPU, 1024 on a GPU).

    One long function on purpose: Gradio declares a page as nested ``with`` blocks, so the function reads top to
    bottom like the page it builds (the handlers live in ``Handlers``, the input checks in ``ui/inputs.py``).
    """
    import gradio as gr

    on_gpu = engine.device.type != "cpu"
    size = int(default_size or engine.model.cfg.image_size)
    t_cfg = teacher_cfg(engine.model.cfg)
    handlers = Handlers(engine, int(edit_max_side or (1024 if on_gpu else 512)))
    choices = I.font_choices(font_files)
    modes = engine.modes

    def generate(*values, progress=gr.Progress()):
        return handlers.generate(*values, progress=progress)

    def compare(*values, progress=gr.Progress()):
        return handlers.compare(*values, progress=progress)

    def on_task(task):  # a mask uploaded for the other task would silently add regions: start clean
        edit = task == I.TASK_EDIT
        return gr.update(visible=not edit), gr.update(visible=edit), gr.update(value=None)

    def on_mode(mode):
        sampler, steps, cfg = I.mode_defaults(mode, t_cfg)
        return gr.update(value=sampler), gr.update(value=steps), gr.update(value=cfg)

    def on_size(width, height):
        try:
            w, h = int(width), int(height)
        except (TypeError, ValueError):
            return gr.update()
        return gr.update(value=_canvas_value(w, h), canvas_size=(w, h))

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}: visual text generation and editing\n{engine.describe()}. "
                    'Put the text to draw in "double quotes"; draw one white region per quoted line '
                    "(or upload a white-on-black mask). Regions are taken top-down (or left-right).")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(value=DEFAULT_PROMPT, lines=2, label='Prompt (text lines in "double quotes")',
                                    elem_id=ELEM["prompt"])
                task = gr.Radio(list(I.TASKS), value=I.TASK_GENERATE, label="Task", elem_id=ELEM["task"])
                with gr.Group(visible=True) as gen_group:
                    canvas = gr.ImageEditor(
                        value=_canvas_value(size, size), label="Positions: draw one white region per text line",
                        type="numpy", image_mode="RGBA", sources=(), transforms=(), layers=False,
                        brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed",
                                       default_size=max(4, size // 16)),
                        canvas_size=(size, size), elem_id=ELEM["canvas"], format="png")
                with gr.Group(visible=False) as edit_group:
                    editor = gr.ImageEditor(
                        label="Image to edit: upload it, then brush over the text regions to rewrite",
                        type="numpy", image_mode="RGBA", sources=("upload", "clipboard"), transforms=(),
                        layers=False, brush=gr.Brush(colors=["#ff00ff", "#ffffff", "#00ffff"], color_mode="fixed"),
                        elem_id=ELEM["edit"], format="png")
                mask = gr.Image(label="…or upload a position mask (white regions on black; added to the strokes)",
                                type="numpy", image_mode="RGB", sources=["upload", "clipboard"], height=200,
                                elem_id=ELEM["mask"], format="png")
                sort = gr.Radio(list(I.SORT_CHOICES), value=next(iter(I.SORT_CHOICES)),
                                label="Order of the regions (line 1 = first region)")
                fonts, use_colors, colors, mimics = [], [], [], []
                with gr.Accordion("Font and colour per line", open=False, elem_id="line_styles"):
                    for i in range(I.MAX_LINES):
                        with gr.Row(equal_height=True):
                            fonts.append(gr.Dropdown(choices, value=I.NO_FONT, label=f"Line {i + 1} font",
                                                     scale=3, elem_id=f"font_{i + 1}"))
                            use_colors.append(gr.Checkbox(value=False, label="set colour", scale=1,
                                                          elem_id=f"use_color_{i + 1}"))
                            colors.append(gr.ColorPicker(value="#000000", label=f"Line {i + 1} colour", scale=1,
                                                         elem_id=f"color_{i + 1}"))
                        mimics.append(_mimic_editor(gr, i + 1, size))
                base_model, style_loras, revise, hollow, show_debug = _own_models_widgets(gr, engine)
                with gr.Accordion("Model and sampling", open=True):
                    mode = gr.Radio(modes, value=I.MODE_TEACHER, label="Model", elem_id="model_mode")
                    with gr.Row():
                        sampler = gr.Dropdown(list(I.SAMPLERS), value="ddim", label="Sampler", elem_id="sampler")
                        steps = gr.Slider(1, 50, value=I.TEACHER_STEPS, step=1, label="Steps", elem_id="steps")
                    with gr.Row():
                        cfg = gr.Slider(1, 15, value=t_cfg, step=0.5, label="CFG scale (1 = off)",
                                        elem_id="cfg")
                        strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength", elem_id="strength")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                        num_images = gr.Slider(1, 4, value=1, step=1, label="Images", elem_id="num_images")
                    with gr.Row():
                        width = gr.Slider(128, 1024, value=size, step=64, label="Width", elem_id="width")
                        height = gr.Slider(128, 1024, value=size, step=64, label="Height", elem_id="height")
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id=ELEM["generate"])
                    cmp_btn = gr.Button("Compare teacher vs student", elem_id=ELEM["compare"],
                                        interactive=engine.has_lora)
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab("Result"):
                        gallery = gr.Gallery(label="Result", columns=2, height="auto", format="png",
                                             object_fit="contain", elem_id=ELEM["gallery"])
                        info = gr.Markdown(elem_id=ELEM["info"])
                        glyphs = gr.Image(label="Rendered glyphs and positions", interactive=False, height=260,
                                          format="png", elem_id=ELEM["glyphs"])
                        debug_gallery = gr.Gallery(label="Debug: glyphs, positions, font hint, mimicked fonts",
                                                   columns=4, height="auto", format="png", object_fit="contain",
                                                   elem_id=ELEM["debug_gallery"])
                    with gr.Tab("Compare"):
                        gr.Markdown(f"Teacher: DDIM 20 steps + CFG {t_cfg:g}. Student (the model choice if it is a "
                                    "student, else teacher + LoRA; the sampler if not DDIM, else LCM): "
                                    "1, 2, 4 and 8 steps without CFG. Same seed and inputs.")
                        cmp_gallery = gr.Gallery(label="Teacher vs student", columns=3, height="auto", format="png",
                                                 object_fit="contain",
                                                 elem_id=ELEM["compare_gallery"])
                        cmp_info = gr.Markdown(elem_id=ELEM["compare_info"])

        inputs = [prompt, task, canvas, editor, mask, sort, *fonts, *use_colors, *colors,
                  mode, sampler, steps, cfg, strength, seed, width, height, num_images,
                  *mimics, revise, hollow, show_debug, base_model, style_loras]
        gen_btn.click(generate, inputs, [gallery, info, glyphs, debug_gallery], concurrency_id="model",
                      concurrency_limit=1, show_progress_on=[gallery])
        for font, mimic in zip(fonts, mimics):
            font.change(lambda f: gr.update(visible=f == I.MIMIC), font, mimic, queue=False)
        cmp_btn.click(compare, inputs, [cmp_gallery, cmp_info], concurrency_id="model", concurrency_limit=1)
        task.change(on_task, task, [gen_group, edit_group, mask], queue=False)
        mode.change(on_mode, mode, [sampler, steps, cfg], queue=False)
        width.release(on_size, [width, height], canvas, queue=False)
        height.release(on_size, [width, height], canvas, queue=False)
    return app


def _own_models_widgets(gr, engine: Engine) -> tuple:
    """The accordion "Your own models and styles" (the original demo's base model path, LoRA paths and ratios, and
    its revise-position / hollow-font / show-debug switches, with its defaults) → its five widgets."""
    with gr.Accordion("Your own models and styles", open=False, elem_id="own_models"):
        base, styles = engine.community
        base_model = gr.Textbox(value=base or "", label="Base model: a community SD-1.5 .safetensors/.ckpt (ldm layout) "
                                "or diffusers folder on the server", elem_id=ELEM["base_model"])
        style_loras = gr.Textbox(value="\n".join(f"{x.path}:{x.ratio:g}" for x in styles), lines=2,
                                 label="Style LoRAs (kohya SD-1.5), one FILE:RATIO per line", elem_id=ELEM["style_loras"])
        with gr.Row():
            revise = gr.Checkbox(value=False, label="Revise position", elem_id=ELEM["revise"])
            hollow = gr.Checkbox(value=True, label="Use hollow font", elem_id=ELEM["hollow"])
            show_debug = gr.Checkbox(value=True, label="Show debug", elem_id=ELEM["show_debug"])
    return base_model, style_loras, revise, hollow, show_debug


def _mimic_editor(gr, line: int, size: int):
    """A line's "mimic from image" editor (shown when its font is "mimic from image", as the original demo)."""
    return gr.ImageEditor(
        label=f"Line {line}: upload an image, then brush over the text whose font to copy (best: as many characters)",
        type="numpy", image_mode="RGBA", sources=("upload", "clipboard"), transforms=(), layers=False,
        brush=gr.Brush(colors=["#ff00ff"], default_color="#ff00ff", color_mode="fixed",
                       default_size=max(4, size // 16)),
        visible=False, elem_id=f"mimic_{line}", format="png")


def launch(app, host: str = "127.0.0.1", port: int | None = None, quiet: bool = True) -> str:
    """Start the server in the background (no share link, no analytics, no server-side rendering) and return its
    local URL; ``app.block_thread()`` then waits until Ctrl-C, ``app.close()`` stops it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=quiet,
               prevent_thread_lock=True, ssr_mode=False, css=CSS, footer_links=[])
    return app.local_url
