"""``anytext2-lcm ui``: the web UI (Gradio) on localhost, on the built-in testbed model by default."""

from __future__ import annotations

import argparse
import logging
import os

from .common import add_community_args, add_model_args, command, number

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "ui", _ui)
    add_model_args(p, lora=True, merge=False)
    add_community_args(p)
    p.add_argument("--font", dest="glyph_font", help="glyph font file (default: a CJK-capable system font)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=number(0, 65535, integer=True), default=7860, help="port (0: any free port)")
    s.add_argument("--size", type=number(64, 4096, integer=True), default=None,
                   help="initial image width/height (None: the model's own size: testbed 128, sd15 512)")
    s.add_argument("--no-warmup", action="store_true", help="skip the small warm-up generation at start")


def _ui(args) -> int:
    """web UI: draw positions, type quoted lines, pick fonts/colours; teacher vs student

    Starts a Gradio app and prints its URL. Generation and editing with the teacher, the teacher + student LoRA (the
    adapter bypassed for the teacher, one network in memory) or the merged student; a compare view puts the teacher's
    20-step DDIM beside the student at 1/2/4/8 steps. Needs the 'ui' extra (pip install 'anytext2-lcm[ui]').
    """
    from ..cli import UsageError
    from ..config import ConfigError, check_image_size

    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise UsageError("the UI needs Gradio: pip install 'anytext2-lcm[ui]' (or `make setup`)") from None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up probes
    if args.size is not None:
        try:
            check_image_size(args.size, "--size")
        except ConfigError as e:
            raise UsageError(str(e)) from None
    port = args.port if args.port else _free_port(args.host)
    _check_port(args.host, port)  # before the model is loaded: fail fast
    from .common import check_model_inputs

    check_model_inputs(args)  # the model, adapter and font files too
    from ..ui.app import build_app, launch
    from ..ui.engine import Engine

    engine = Engine.load(args.model, lora=args.lora, lora_scale=args.lora_scale, device=args.device,
                         dtype=args.dtype, config=args.config, trust_pickle=args.trust_pickle,
                         glyph_font=args.glyph_font, base_model=args.base_model, style_loras=args.style_lora)
    log.info("%s", engine.describe().replace("`", ""))
    if not args.no_warmup:
        log.info("warm-up generation took %.1f s", engine.warmup())
    app = build_app(engine, default_size=args.size)
    try:
        url = launch(app, host=args.host, port=port)
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{port} ({e}); pass another --port") from None
    print(f"anytext2-lcm ui: running on {url}  (Ctrl-C to stop)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int) -> None:
    import socket

    from ..cli import UsageError

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            s.bind((host if host not in ("0.0.0.0", "") else "", port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port (0: any free "
                         "port)") from None
