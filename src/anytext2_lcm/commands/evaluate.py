"""``anytext2-lcm evaluate`` and ``anytext2-lcm bench``."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub) -> None:
    from .common import CFG, MAX_STEPS, POSITIVE, SEED, STEPS, add_model_args, command, number, number_list
    from ..evaluate.runner import EVAL_A_PROMPT, EVAL_N_PROMPT
    from ..evaluate.runtime import add_runtime_args
    from ..defaults import STUDENT_STEPS, TEACHER_STEPS

    p = command(sub, "evaluate", _evaluate)
    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", required=True, help="AnyWord JSON file(s)")
    d.add_argument("--num", type=POSITIVE, default=None, help="evaluate the first N usable samples")
    d.add_argument("--size", type=number(64, 8192, integer=True), default=None,
                   help="generation size (polygons are scaled to it; default: the model's own size)")
    d.add_argument("--source-size", type=number(1, 65536, integer=True), default=512,
                   help="image size assumed for rows whose image file is missing")
    d.add_argument("--max-lines", type=number(1, 1000, integer=True), default=20)
    d.add_argument("--max-chars", type=number(1, 1000, integer=True), default=20)
    d.add_argument("--font", dest="glyph_font", default=None, help="glyph font (default: a CJK-capable system font)")
    s = p.add_argument_group("sampling")
    s.add_argument("--images-per-prompt", type=number(1, 64, integer=True), default=1,
                   help="images per sample (the benchmark uses 4)")
    s.add_argument("--seed", type=SEED, default=100, help="seed of sample 0 (sample i: seed + i)")
    s.add_argument("--teacher-steps", type=STEPS, default=TEACHER_STEPS)
    s.add_argument("--teacher-cfg", type=CFG, default=None,
                   help="the teacher's CFG scale (default: the model's own: 7.5, the testbed's 5)")
    s.add_argument("--student-steps", type=number_list(1, MAX_STEPS), default=STUDENT_STEPS,
                   help="comma-separated step counts")
    s.add_argument("--student-sampler", default=None, choices=["lcm", "tcd", "pcm", "ddim"],
                   help="default: the sampler the adapter records (lcm for an adapter that records none)")
    s.add_argument("--student-cfg", type=CFG, default=None, help="default: the adapter's recorded scale (1)")
    s.add_argument("--gamma", type=number(0, 1), default=None, help="TCD gamma")
    s.add_argument("--num-phases", type=STEPS, default=None, help="PCM: the student's phases")
    s.add_argument("--phase-convention", default=None, choices=["inference", "official"],
                   help="PCM: where the student's phase edges are (default: inference)")
    s.add_argument("--original-steps", type=STEPS, default=None,
                   help="lcm/tcd/pcm: points of the student's distillation grid (distill.num_ddim_timesteps; "
                        "default 50)")
    s.add_argument("--timestep-spacing", default=None, choices=["trailing", "leading"],
                   help="lcm/tcd/pcm: where the grid's points are (distill.timestep_spacing; default: the adapter's "
                        "recorded one, else trailing)")
    s.add_argument("--a-prompt", default=EVAL_A_PROMPT)
    s.add_argument("--n-prompt", default=EVAL_N_PROMPT)
    s.add_argument("--no-warmup", action="store_true", help="time the first call too")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--train-run", default=None,
                   help="the student's distillation run folder: its loss curve goes into the report (default: the "
                        "folder holding --lora when it has a metrics.jsonl)")
    o.add_argument("--grid-rows", type=number(1, 1000, integer=True), default=8, help="samples per grid image")
    o.add_argument("--max-grids", type=number(0, 10**6, integer=True), default=4, help="grid images at most")
    o.add_argument("--no-student-images", action="store_true", help="do not keep student images (only grids)")
    o.add_argument("--no-reference", action="store_true",
                   help="do not read the dataset's own images (the 'reference' row)")
    o.add_argument("--reconstruction", action="store_true",
                   help="also read the model's VAE reconstructions of the dataset's images (the ceiling of any "
                        "generated image: the 'reconstruction' row)")
    o.add_argument("--ocr-model", default=None, help="PP-OCR recogniser ONNX (default: the one in rapidocr)")
    add_runtime_args(p)
    add_bench_args(command(sub, "bench", _bench))


def _evaluate(args) -> int:
    """teacher vs student: OCR accuracy (Sen.ACC, NED), fidelity, speed; JSON + Markdown report + grids

    Generates every sample of AnyWord-format annotation files (e.g. from make-data, or the AnyText benchmark's
    test1k.json) with the teacher (DDIM + CFG, adapters off) and the student at each step count under the same seeds
    and x_T, reads every line with the offline PP-OCRv4 recogniser and writes OUT/results.json, OUT/report.md,
    OUT/grids/*.png and OUT/images/.
    """
    from ..cli import UsageError
    from ..defaults import student_sampling
    from ..samplers import sampler_options as known_options
    from .common import build_model, default_sampling, pick_device, pick_dtype, sampler_options
    from ..generation import InputError
    from ..evaluate.ocr import TextReader
    from ..evaluate.report import write_report
    from ..evaluate.runner import EvalConfig, evaluate
    from ..evaluate.runtime import resolve_runtime_args, runtime_from_args
    from .common import check_model_inputs, check_output_dir

    check_output_dir(args.out)  # before anything is loaded: the folder, the data, model, adapter, decoder, font
    for f in args.data:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--data {f}: annotation file not found")
    model_cfg = check_model_inputs(args)
    sampling = default_sampling(args.lora, args.student_sampler, model_cfg)
    if sampling.sampler == "ddim":  # no adapter: the student runs are the teacher's weights with the LCM sampler
        sampling = student_sampling("lcm")
    student_sampler = args.student_sampler or sampling.sampler
    student_cfg = args.student_cfg if args.student_cfg is not None else sampling.cfg
    recorded = {k: v for k, v in sampling.options.items() if k in known_options(student_sampler)}
    opts = {**recorded, **sampler_options(args, student_sampler, "--student-sampler")}
    train_run = args.train_run
    if train_run is None and args.lora:
        parent = Path(args.lora).resolve().parent
        train_run = parent if (parent / "metrics.jsonl").is_file() else None
    elif train_run is not None and not (Path(train_run) / "metrics.jsonl").is_file():
        raise UsageError(f"--train-run {train_run}: no metrics.jsonl in that folder (a distill output folder has one)")
    cfg = EvalConfig(data=tuple(args.data), num=args.num, size=args.size, images_per_prompt=args.images_per_prompt,
                     seed=args.seed, teacher_steps=args.teacher_steps, teacher_cfg=args.teacher_cfg,
                     student_steps=args.student_steps, student_sampler=student_sampler,
                     student_cfg=student_cfg, student_options=opts, max_lines=args.max_lines,
                     max_chars=args.max_chars, source_size=args.source_size, a_prompt=args.a_prompt,
                     n_prompt=args.n_prompt, glyph_font=args.glyph_font, warmup=not args.no_warmup,
                     save_student_images=not args.no_student_images, reference=not args.no_reference,
                     reconstruction=args.reconstruction)
    resolve_runtime_args(args, pick_device(args.device))
    runtime = runtime_from_args(args)
    reader = TextReader(args.ocr_model)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = build_model(args.model, config_path=args.config, trust_pickle=args.trust_pickle)
    if args.lora:
        # loaded unmerged: the teacher runs with the adapters bypassed; --merge-lora merges after the teacher
        from .. import lora as L

        L.load_lora(model, args.lora)
        if args.lora_scale != 1.0:
            L.set_lora_scale(model, args.lora_scale)
    else:
        log.warning("no --lora: the 'student' runs are the teacher's weights with the %s sampler", student_sampler)
    model = model.to(device=device, dtype=dtype).eval()
    try:
        results = evaluate(model, cfg, args.out, reader=reader, runtime=runtime,
                           merge_lora_for_students=bool(args.lora and args.merge_lora))
    except InputError as e:
        raise UsageError(str(e)) from None
    results["config"]["model_spec"] = args.model
    results["config"]["lora_path"] = args.lora
    paths = write_report(results, args.out, grid_rows=args.grid_rows, max_grids=args.max_grids,
                         train_run=train_run)
    from ..evaluate.report import results_table

    print(results_table(results))
    print(f"wrote {paths['json']}, {paths['markdown']} and {len(paths) - 2} grid image(s)")
    return 0


def _bench(args) -> int:
    """end-to-end seconds per image, teacher (20/50-step DDIM + CFG) vs student (1-8 steps), with components

    Times the teacher and the student side by side in one process (warm-up, interleaved rounds, median), the cost of
    each component, the measured and eval-count ratios and the goals. Default: the sd15 architecture with random
    weights at 256 px.
    """
    return _bench_run(args)


def add_bench_args(p) -> None:
    """The options of ``anytext2-lcm bench`` (also ``benchmarks/speed.py``, which runs that command)."""
    from ..evaluate.runtime import add_runtime_args
    from .common import CFG, MAX_STEPS, number, number_list

    p.add_argument("--model", default="sd15", help="'sd15' (real architecture, random weights), 'tiny', or a "
                                                   "converted folder / checkpoint")
    p.add_argument("--size", type=number(64, 8192, integer=True), default=256,
                   help="image side (256 on a CPU, 512 on a GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="model precision (auto: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--teacher-steps", type=number_list(1, MAX_STEPS), default=(20, 50), help="teacher DDIM step counts")
    p.add_argument("--student-steps", type=number_list(1, MAX_STEPS), default=(1, 2, 4, 8), help="student step counts")
    p.add_argument("--teacher-cfg", type=CFG, default=None,
                   help="the teacher's CFG scale (default: the model's own: 7.5, the testbed's 5; --goal: 7.5)")
    p.add_argument("--student-sampler", default="lcm", choices=["lcm", "tcd", "pcm"])
    p.add_argument("--repeats", type=number(1, 1000, integer=True), default=3, help="timed rounds (median reported)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-components", action="store_true", help="skip the per-component timings")
    p.add_argument("--variants", default="",
                   help="settings to time after the base in the same run, ';'-separated, each '+'-joined tokens: "
                        "channels_last, vae_bf16, bf16, tiny_decoder, compile, lora, lora_merged "
                        "(e.g. 'channels_last;vae_bf16;tiny_decoder;bf16')")
    p.add_argument("--variant-runs", default="",
                   help="comma-separated runs to time for the variants, e.g. teacher@20,teacher@50,student@2,student@4 "
                        "(default: all)")
    p.add_argument("--json", default=None, help="also write the results here")
    g = p.add_argument_group("the speed goal (--goal)")
    g.add_argument("--goal", action="store_true",
                   help="time the student (--student-steps, default 1,2,4) plain and with each of --options against "
                        "the 20-step teacher run as the original runs it (fp32, CFG as two passes, full decoder), "
                        "interleaved, at each of --sizes; check the goal (4 steps: >= 16x at 256 px, >= 12x at 512)")
    g.add_argument("--sizes", type=number_list(64, 8192), default=(256, 512), help="--goal: image sides")
    g.add_argument("--options", default="tiny_decoder;bf16;channels_last;fast",
                   help="--goal: ';'-separated student settings, each '+'-joined variant tokens; 'fast' = what "
                        "--fast selects on this device")
    g.add_argument("--like-for-like", default="fast",
                   help="--goal: ';'-separated options whose teacher is timed with the same settings too ('base': "
                        "the plain teacher)")
    add_runtime_args(p)


def _bench_goal(args) -> int:
    from ..evaluate.goal import GoalConfig, format_goal, run_goal

    split = lambda text: tuple(v.strip() for v in text.split(";") if v.strip())  # noqa: E731
    students = args.student_steps if args.student_steps != (1, 2, 4, 8) else (1, 2, 4)
    cfg = GoalConfig(model=args.model, sizes=args.sizes, device=args.device, options=split(args.options),
                     like_for_like=split(args.like_for_like), student_steps=students,
                     teacher_steps=args.teacher_steps[0], student_sampler=args.student_sampler,
                     repeats=args.repeats, tiny_decoder=args.tiny_decoder or "random",
                     **({"teacher_cfg": args.teacher_cfg} if args.teacher_cfg is not None else {}))
    save = (lambda d: _write_json(args.json, d)) if args.json else None  # after each size: a long run keeps it
    doc = run_goal(cfg, log_fn=lambda s: print(s, flush=True), on_size=save)
    print()
    print(format_goal(doc))
    return 0


def _write_json(path: str, doc: dict) -> None:
    from ..atomic import write_json
    from ..evaluate.report import _strict

    write_json(path, _strict(doc), indent=1)


def _bench_run(args) -> int:
    from ..evaluate.bench import BenchConfig, format_report, run_bench
    from ..evaluate.runtime import resolve_runtime_args, runtime_from_args
    from ..factory import pick_device

    if args.goal:
        return _bench_goal(args)
    resolve_runtime_args(args, pick_device(args.device), fallback_decoder="random")

    cfg = BenchConfig(model=args.model, size=args.size, device=args.device, dtype=args.dtype,
                      teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                      teacher_cfg=args.teacher_cfg, student_sampler=args.student_sampler, repeats=args.repeats,
                      warmup=not args.no_warmup, components=not args.no_components,
                      runtime=runtime_from_args(args),
                      variants=tuple(v.strip() for v in args.variants.split(";") if v.strip()),
                      variant_runs=tuple(v.strip() for v in args.variant_runs.split(",") if v.strip()))
    doc = run_bench(cfg, log_fn=lambda s: print(s, flush=True))
    print()
    print(format_report(doc))
    if args.json:
        _write_json(args.json, doc)
    return 0
