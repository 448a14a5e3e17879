"""The web UI (``anytext2-lcm ui``): generation and editing with the teacher or a student LoRA, and a compare view.

* :mod:`.inputs`: pure helpers, widget values → ``GenerationRequest`` with readable errors (no Gradio needed);
* :mod:`.engine`: the model and its three uses (teacher, teacher + LoRA, merged student) in one network;
* :mod:`.app`: ``build_app(engine) -> gradio.Blocks`` and ``launch(app, host, port)`` (imports Gradio).
"""

from .engine import CompareCell, Engine  # noqa: F401
from .inputs import (  # noqa: F401
    MODE_MERGED, MODE_STUDENT, MODE_TEACHER, MODES, TASK_EDIT, TASK_GENERATE, ComparePlan, LineStyle, UiInputs,
    build_request, compare_plan,
)


def build_app(engine, **kwargs):
    """``gradio.Blocks`` for ``engine`` (see :func:`anytext2_lcm.ui.app.build_app`); imports Gradio."""
    from .app import build_app as _build

    return _build(engine, **kwargs)
