"""The training loop on Accelerate: one process, many GPUs or many nodes (``accelerate launch``), CPU included.

:func:`train` runs a :class:`~.config.TrainConfig` to the end (or to a preemption) and returns a :class:`RunResult`.
The method (``lcm``, ``pcm``, ``teacher``, ``vae``, ``ocr``, ``decoder``) supplies what trains and the loss of a micro-step; this file does the rest:

* **Data**: the AnyWord reader with an epoch-seeded order sharded by rank (``data.collate.EpochSampler``); the
  position inside the epoch, the epoch and the skip counters are checkpointed per rank. Per-sample randomness comes
  from (seed, epoch, index) (``state.sample_generators``): a sample gets the same noise on any rank.
* **Precision**: Accelerate autocast (bf16/fp16); trainable weights fp32; fp16 on a CPU becomes fp32 with a warning.
* **Accumulation** is driven here (not by Accelerate's counter, which a mid-window resume would misalign): DDP
  synchronises only on the last micro-step of a window; the loss is divided by the window length.
* **Non-finite guard**: a window whose loss (any rank) or gradient norm is not finite is skipped — no optimizer or
  scheduler step — counted and logged; ``train.max_consecutive_nonfinite`` in a row stop the run. With an fp16
  gradient scaler, non-finite gradients are the scaler's business (it skips and backs off) and are counted apart.
* **Preemption**: SIGTERM/SIGINT set a flag; before each micro-step the ranks agree (MAX all-reduce), save a
  checkpoint where they are (inside a window too: the accumulated gradients are saved) and exit 128 + signal (143
  for SIGTERM). A second signal exits at once; the atomic checkpoints make that safe.
* **Checkpoints** every N steps, at the end and on a stop (``distill.checkpoints``); ``checkpoint.resume`` latest or a
  folder restores weights, optimizer, scheduler, scaler, counters, per-rank RNG, data position and partial
  gradients, after checking the structural config and the teacher fingerprint.
* **Logging**: TensorBoard (through Accelerate) and ``OUTPUT/metrics.jsonl``: loss, lr, grad norm, skipped samples,
  non-finite steps, steps/s; validation images at the sampler's exact inference timesteps; a tqdm bar.

Collectives happen in the same order on every rank (per micro-step: a stop-flag all-reduce, a data-abort
all-reduce; per step: one flag and one sum all-reduce; checkpoint saves), so no rank waits on a collective another
rank skips. Validation runs on the main process; a barrier follows it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_text
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data.skips import TooManySkipsError
from .autoencoder import VAEMethod
from .batch import Method
from .checkpoints import CheckpointManager, CheckpointReader, checkpoint_name
from .components import (StopSignals, build_teacher, enable_gradient_checkpointing, flatten, load_trainable,
                         make_optimizer, teacher_fingerprint, trainable_state)
from .config import TrainConfig, dump_yaml
from .data import build_loader, stand_in_batch
from .elastic import BATCH_KEYS, load_init_adapter, load_moved, resume_accumulation, structure_diff
from .decoder import DecoderMethod
from .lcm import LCMMethod
from .pcm import PCMMethod
from .recognizer import OCRMethod
from .state import TrainState, WindowState, capture_rng, restore_rng, seed_everything
from .teacher import TeacherMethod

log = logging.getLogger(__name__)

METHODS: dict[str, type[Method]] = {"lcm": LCMMethod, "pcm": PCMMethod, "teacher": TeacherMethod, "vae": VAEMethod,
                                    "ocr": OCRMethod, "decoder": DecoderMethod}
"""Method name → implementation."""
EXIT_PREEMPTED = 143


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """diffusers' learning-rate scheduler ``optim.lr_scheduler`` with ``optim.lr_warmup_steps``, spanning
    ``optim.lr_schedule_steps`` (default ``train.max_steps``) optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps,
                         num_training_steps=cfg.optim.lr_schedule_steps or cfg.train.max_steps)


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class RunResult:
    """What a run did.

    Attributes:
        exit_code: 0 finished, 128 + signal number when stopped by a signal (143 SIGTERM).
        state: the counters at the end.
        losses: (step, loss) logged by this run, in order.
        outputs: result files (adapter / model), empty when stopped early.
        checkpoint: the last checkpoint this run wrote (or resumed from).
    """

    exit_code: int
    state: TrainState
    losses: list[tuple[int, float]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    checkpoint: Path | None = None


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class Trainer:
    """One training run; see the module docstring. Use :func:`train`.

    Args:
        cfg: a validated configuration.
        fault: checkpoint fault-injection hook (tests), see ``CheckpointManager``.
        stop_at_micro_step: behave as if SIGTERM arrived during this micro-step (tests of the stop path).
    """

    def __init__(self, cfg: TrainConfig, fault: Callable[[str], None] | None = None,
                 stop_at_micro_step: int | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.stop_at_micro_step = stop_at_micro_step
        t = cfg.train
        cuda = torch.cuda.is_available()
        if t.device == "cuda" and not cuda:
            raise ConfigError("train.device='cuda': CUDA is not available on this machine")
        use_cpu = t.device == "cpu" or not cuda
        mp = t.mixed_precision
        if mp == "fp16" and use_cpu:
            log.warning("train.mixed_precision=fp16 on a CPU: fp16 there is a no-op or ~40x slower; using fp32")
            mp = "no"
        self.mixed_precision = mp
        # Accelerate keeps its settings in a per-process singleton; a second run in the same process (library use,
        # tests) may ask for another precision. Reset the accelerator-level part only: the process group stays.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            cpu=use_cpu, mixed_precision=mp, gradient_accumulation_steps=1,
            log_with="tensorboard" if cfg.logging.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.ddp_find_unused_parameters)])
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.main = acc.is_main_process
        if not self.main:  # one voice for progress; warnings (stops, skips) still come from every rank
            logging.getLogger("anytext2_lcm").setLevel(logging.WARNING)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.checkpoint.keep_last, self.rank, self.world,
                                      barrier=acc.wait_for_everyone, all_ok=self._all_ok, fault=fault)
        self.method: Method = METHODS[cfg.method](cfg)
        self.state = TrainState()
        self.window = WindowState()
        self.losses: list[tuple[int, float]] = []
        self.last_checkpoint: Path | None = None
        self._stash = None  # the last prepared micro-batch (stands in, with weight 0, for an all-skipped one)

    # ---- collectives --------------------------------------------------------------------------------------

    def _reduce(self, values: list[float], op: str) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _all_ok(self, ok: bool) -> bool:
        return self._reduce([0.0 if ok else 1.0], "max")[0] == 0.0

    # ---- setup --------------------------------------------------------------------------------------------

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from (None: fresh start), checked against this run's structure and teacher."""
        resume = self.cfg.checkpoint.resume
        if resume is None:
            if self.ckpt.existing():
                raise ConfigError(f"checkpoint.resume=None: {self.ckpt.root} already holds checkpoints; pass "
                                  f"checkpoint.resume=latest to continue that run, checkpoint.resume=fresh to start "
                                  f"over (they are moved aside, not deleted), or choose another output_dir")
            return None
        path = self.ckpt.resolve(resume)  # latest: raises naming each checkpoint when none is usable
        if path is None:
            log.info("checkpoint.resume=%s: no checkpoint to continue in %s, starting fresh", resume, self.ckpt.root)
            return None
        saved = CheckpointReader(path).json("train_state.json")
        diff = structure_diff(saved["structure"], {**self.cfg.structure(), "world_size": self.world})
        if diff:
            raise CheckpointError(f"cannot resume from {path}: it was made with other structural settings ("
                                  + "; ".join(diff) + "); use a new output_dir to start a different run")
        self._geometry(path, saved)  # another number of processes: the global batch must be kept
        if saved["teacher"] != self.teacher_id:
            raise CheckpointError(f"cannot resume from {path}: it was trained from another teacher "
                                  f"({saved['teacher']}, this run {self.teacher_id})")
        return path

    def _geometry(self, path: Path, saved: dict) -> int:
        """The gradient accumulation to resume ``saved`` with (``distill.elastic``: the global batch is kept)."""
        t, st = self.cfg.train, saved["state"]
        a0 = int(saved["structure"]["train.gradient_accumulation_steps"])
        return resume_accumulation(path, saved["structure"], t.batch_size, t.gradient_accumulation_steps, self.world,
                                   int(st["micro_step"]) - int(st["global_step"]) * a0)

    def _decide_start(self) -> None:
        """Rank 0 fingerprints the teacher and picks (and verifies) the checkpoint; every rank gets its answer, or
        its error, so that all start from the same point or all stop."""
        answer: list = [None, None, None]  # teacher id, resume path, (error class, message)
        if self.main:
            try:
                answer[0] = self.teacher_id = teacher_fingerprint(self.cfg.model.teacher, self.cfg.model)
                path = self._resume_point()
                answer[1] = str(path) if path is not None else None
            except (ConfigError, CheckpointError) as e:
                answer[2] = (type(e).__name__, str(e))
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(answer, src=0)
        if answer[2] is not None:
            raise (ConfigError if answer[2][0] == "ConfigError" else CheckpointError)(answer[2][1])
        self.teacher_id = answer[0]
        self.resume_from = Path(answer[1]) if answer[1] is not None else None

    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self._decide_start()  # before anything heavy: a wrong resume fails fast
        if self.resume_from is not None:  # every rank takes the accumulation rank 0 checked
            saved = CheckpointReader(self.resume_from).json("train_state.json")
            cfg.train.gradient_accumulation_steps = self._geometry(self.resume_from, saved)
        seed_everything(cfg.train.seed + self.rank)
        model = build_teacher(cfg.model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)  # the LoRA initialisation: the same on every rank and resume
            params = self.method.configure_model(model)
        if cfg.checkpoint.init_adapter and self.resume_from is None:
            load_init_adapter(model, cfg.checkpoint.init_adapter, cfg.lora.adapter_name, cfg.lora.alpha)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.train.cast_frozen and self.mixed_precision != "no":
            dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
            prefixes = self.method.frozen_cast_prefixes()
            for n, p in model.named_parameters():
                if not p.requires_grad and n.startswith(prefixes):
                    p.data = p.data.to(dtype)
        model.to(acc.device)
        self.method.set_train_mode(model)
        self.model = model
        self.params = params
        self.loader = build_loader(cfg, self.rank, self.world)
        optimizer = make_optimizer(params, cfg.optim)
        self.scheduler = lr_schedule(optimizer, cfg)
        self.net, self.optimizer = acc.prepare(self.method.network(model), optimizer)
        if self.resume_from is not None:
            self._load(self.resume_from)
        else:
            self.loader.set_epoch(0)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "config.yaml", dump_yaml(cfg))
            self._truncate_metrics()
        if cfg.logging.tensorboard:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                    for k, v in flatten(cfg.to_dict()).items()}
            kwargs = {"tensorboard": {"purge_step": self.state.global_step + 1}} if self.resume_from else {}
            acc.init_trackers("train", config=flat, init_kwargs=kwargs)
        n = sum(p.numel() for p in params)
        log.info("%s: %d trainable parameters, %d process(es) on %s, precision %s, %s", cfg.method, n, self.world,
                 acc.device, self.mixed_precision, f"resuming from {self.resume_from}" if self.resume_from
                 else "fresh start")

    # ---- checkpoints --------------------------------------------------------------------------------------

    def _grads(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: p.grad.detach().cpu() for p in self.params if p.grad is not None}

    def save(self) -> Path:
        ga = self.cfg.train.gradient_accumulation_steps
        s, r = self.state, self.rank
        m = s.micro_in_window(ga)
        shared = {}
        if self.main:
            shared = {"trainable.safetensors": trainable_state(self.model),
                      "optimizer.pt": self.optimizer.state_dict(),
                      "scheduler.pt": self.scheduler.state_dict(),
                      "train_state.json": {"state": s.to_dict(), "structure": {**self.cfg.structure(),
                                                                               "world_size": self.world},
                                           "teacher": self.teacher_id, "config_fingerprint": self.cfg.fingerprint()}}
            if self.accelerator.scaler is not None:
                shared["scaler.pt"] = self.accelerator.scaler.state_dict()
        local = {f"rng_rank{r}.pt": capture_rng(),
                 f"data_rank{r}.json": {"loader": self.loader.state_dict(), "window": self.window.to_dict()}}
        if m:
            local[f"grads_rank{r}.safetensors"] = self._grads()
        path = self.ckpt.save(s.global_step, m, shared, local)
        self.last_checkpoint = path
        return path

    def _load(self, path: Path) -> None:
        reader = CheckpointReader(path)
        saved = reader.json("train_state.json")
        load_trainable(self.model, reader.tensors("trainable.safetensors"), str(path))
        self.optimizer.load_state_dict(reader.obj("optimizer.pt"))
        self.scheduler.load_state_dict(reader.obj("scheduler.pt"))
        if self.accelerator.scaler is not None and reader.has("scaler.pt"):
            self.accelerator.scaler.load_state_dict(reader.obj("scaler.pt"))
        self.state = TrainState.from_dict(saved["state"])
        t = self.cfg.train
        if tuple(int(saved["structure"].get(k, self.world)) for k in BATCH_KEYS) != (
                t.batch_size, t.gradient_accumulation_steps, self.world):
            load_moved(self, reader, saved)  # another number of processes (at a step boundary)
            self.last_checkpoint = path
            return
        r = self.rank
        data = reader.json(f"data_rank{r}.json")
        self.loader.load_state_dict(data["loader"])
        self.window = WindowState.from_dict(data["window"])
        if self.state.micro_in_window(self.cfg.train.gradient_accumulation_steps):
            grads = reader.tensors(f"grads_rank{r}.safetensors")
            named = dict(self.model.named_parameters())
            for k, g in grads.items():
                named[k].grad = g.to(device=named[k].device, dtype=named[k].dtype)
        restore_rng(reader.obj(f"rng_rank{r}.pt"))
        self.last_checkpoint = path
        log.info("resumed from %s at step %d (micro-step %d, epoch %d)", path, self.state.global_step,
                 self.state.micro_step, self.state.epoch)

    # ---- logging ------------------------------------------------------------------------------------------

    def _truncate_metrics(self) -> None:
        """Move metrics.jsonl lines beyond the resumed step (from a run that died after its checkpoint, or all of a
        previous run's on a fresh start) to ``metrics.dropped.jsonl``: the log continues from this run's step."""
        f = self.out / "metrics.jsonl"
        if not f.exists():
            return
        keep, drop = [], []
        for ln in f.read_text().splitlines():
            try:
                (keep if json.loads(ln)["step"] <= self.state.global_step else drop).append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line torn by a kill
        if drop:
            with open(self.out / "metrics.dropped.jsonl", "a") as d:
                d.write("".join(ln + "\n" for ln in drop))
        write_text(f, "".join(ln + "\n" for ln in keep))

    def _log(self, scalars: dict[str, float]) -> None:
        step = self.state.global_step
        if self.cfg.logging.tensorboard:
            self.accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def validate(self) -> None:
        """Validation images on the main process (the others wait at the barrier after it)."""
        from .validation import render_validation

        if self.main:
            try:
                images = render_validation(self.model, self.cfg, self.out / "validation", self.state.global_step)
                if self.cfg.logging.tensorboard and images:
                    tracker = self.accelerator.get_tracker("tensorboard")
                    for name, img in images.items():
                        tracker.writer.add_image(f"validation/{name}", img, self.state.global_step, dataformats="HWC")
            finally:
                self.method.set_train_mode(self.model)
        self.accelerator.wait_for_everyone()

    # ---- the loop -----------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg, acc = self.cfg, self.accelerator
        with StopSignals() as signals:
            code = self._loop(signals)
        outputs = []
        if code == 0:
            if self.last_checkpoint is None or self.last_checkpoint.name != checkpoint_name(self.state.global_step):
                self.save()
            if self.main:
                outputs = self.method.save_results(self.model, self.out)
                log.info("wrote %s", ", ".join(str(p) for p in outputs))
            acc.wait_for_everyone()
        if cfg.logging.tensorboard:
            acc.end_training()
        return RunResult(code, self.state, self.losses, outputs, self.last_checkpoint)

    def _loop(self, signals: StopSignals) -> int:
        cfg, s = self.cfg, self.state
        t = cfg.train
        ga = t.gradient_accumulation_steps
        bar = None
        if self.main and cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.max_steps, initial=s.global_step, desc=cfg.method, dynamic_ncols=True)
        data_iter = None
        last_time = time.perf_counter()
        try:
            while s.global_step < t.max_steps:
                # Stop? All ranks agree before touching the next batch, so the saved data position is exact.
                if self.stop_at_micro_step is not None and s.micro_step >= self.stop_at_micro_step:
                    signals.signum = signals.signum or signal.SIGTERM
                stop = self._reduce([float(signals.signum or 0)], "max")[0]
                if stop:
                    signum = int(stop)
                    log.warning("stopping at step %d (micro-step %d): saving a checkpoint", s.global_step,
                                s.micro_step)
                    here = checkpoint_name(s.global_step, s.micro_in_window(ga))
                    if self.last_checkpoint is None or self.last_checkpoint.name != here:
                        self.save()  # (not again when the periodic checkpoint of this very point exists)
                    return 128 + signum
                if data_iter is None:
                    data_iter = iter(self.loader)
                abort = ""
                try:
                    batch = next(data_iter)
                except StopIteration:
                    s.epoch += 1
                    self.loader.set_epoch(s.epoch)
                    data_iter = None
                    continue
                except TooManySkipsError as e:
                    batch, abort = None, str(e)
                if batch is not None and not batch["texts"] and self._stash is None:
                    abort = self._prepare_stand_in()
                if self._reduce([1.0 if abort else 0.0], "max")[0]:
                    raise TooManySkipsError(abort or "the data reader skipped too many samples on another rank")
                self._micro_step(batch, ga)
                if cfg.debug.sleep_per_step:
                    time.sleep(cfg.debug.sleep_per_step)
                if s.micro_in_window(ga) == ga:
                    scalars = self._optimizer_step()
                    now = time.perf_counter()
                    scalars["steps_per_sec"] = 1.0 / max(now - last_time, 1e-9)
                    last_time = now
                    if s.global_step % cfg.logging.log_every_n_steps == 0 or s.global_step == t.max_steps:
                        self._log(scalars)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{scalars['loss']:.4g}", lr=f"{scalars['lr']:.2e}")
                    v = cfg.validation.every_n_steps
                    if v and (s.global_step % v == 0 or s.global_step == t.max_steps):
                        self.validate()
                    c = cfg.checkpoint.every_n_steps
                    if c and s.global_step % c == 0 and s.global_step < t.max_steps:
                        self.save()
            return 0
        finally:
            if bar is not None:
                bar.close()

    def _prepare_stand_in(self) -> str:
        """An all-skipped micro-batch came before any usable one: stash a stand-in batch read from the data (run
        with weight 0 by :meth:`_micro_step`). Returns "" or why the run must stop (every rank agrees on it next)."""
        s, acc = self.state, self.accelerator
        try:
            with acc.autocast():
                self._stash = self.method.prepare(self.model, stand_in_batch(self.loader, s.epoch),
                                                  self.cfg.train.seed, s.epoch, acc.device)
        except TooManySkipsError as e:
            return str(e)
        return ""

    def _micro_step(self, batch: dict, ga: int) -> None:
        cfg, acc, s, w = self.cfg, self.accelerator, self.state, self.window
        kept = len(batch["texts"])
        w.skipped += len(batch["skip_records"])
        sync = s.micro_in_window(ga) + 1 == ga
        ctx = contextlib.nullcontext() if sync or self.world == 1 else acc.no_sync(self.net)
        with ctx:
            with acc.autocast():
                if kept:
                    tb = self.method.prepare(self.model, batch, cfg.train.seed, s.epoch, acc.device)
                    self._stash = tb
                else:
                    # Every sample was skipped: run the last good batch (before any, a stand-in read from the data)
                    # with weight 0, so that this rank still joins DDP's collectives and adds nothing to them.
                    tb = self._stash  # (set by _loop before the data-abort agreement)
                out = self.method.step(self.net, self.model, tb)
                loss = out.loss
                if s.global_step + 1 in cfg.debug.nonfinite_loss_at_steps:
                    loss = loss * float("nan")
            finite = bool(torch.isfinite(loss.detach()))
            acc.backward(loss * ((1.0 if kept else 0.0) / ga))
        s.micro_step += 1
        if kept:
            w.samples += kept
            if finite:
                w.loss_sum += float(loss.detach())
                w.loss_count += 1
                for k, v in out.logs.items():
                    w.extras[k] = w.extras.get(k, 0.0) + float(v)
            else:
                w.nonfinite = True

    def _optimizer_step(self) -> dict[str, float]:
        cfg, acc, s, w = self.cfg, self.accelerator, self.state, self.window
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf
        norm = acc.clip_grad_norm_(self.params, max_norm)
        norm = float(norm) if norm is not None else 0.0
        loss_bad, grad_bad = self._reduce([float(w.nonfinite), float(not math.isfinite(norm))], "max")
        loss_sum, count, samples, skipped = self._reduce([w.loss_sum, w.loss_count, w.samples, w.skipped], "sum")
        lr = self.scheduler.get_last_lr()[0]
        if not samples:  # every sample of the window was skipped, on every rank: nothing to learn from
            if acc.scaler is not None:
                acc.scaler.update()
            s.empty_steps += 1
            log.warning("step %d skipped: none of its %d samples was usable (all skipped by the data reader); no "
                        "update (%d such steps in all)", s.global_step + 1, int(skipped), s.empty_steps)
        elif loss_bad or (grad_bad and acc.scaler is None):
            if acc.scaler is not None:
                acc.scaler.update()  # clip_grad_norm_ unscaled (and recorded Inf); close the scaler's iteration
            s.nonfinite_steps += 1
            s.consecutive_nonfinite += 1
            log.warning("step %d skipped: non-finite %s (%d in a row, %d in all)", s.global_step + 1,
                        "loss" if loss_bad else "gradients", s.consecutive_nonfinite, s.nonfinite_steps)
        else:
            self.optimizer.step()
            if acc.optimizer_step_was_skipped:
                s.overflow_steps += 1  # fp16 scaler overflow: it skipped and backed off
            else:
                self.scheduler.step()
                s.optimizer_steps += 1
            s.consecutive_nonfinite = 0
        self.optimizer.zero_grad(set_to_none=True)
        s.global_step += 1
        s.samples_seen += int(samples)
        s.skipped_samples += int(skipped)
        extras = {k: v / w.loss_count for k, v in w.extras.items()} if w.loss_count else {}
        self.window = WindowState()
        step_loss = loss_sum / count if count else float("nan")
        self.losses.append((s.global_step, step_loss))
        if s.consecutive_nonfinite > cfg.train.max_consecutive_nonfinite:
            raise NonFiniteTrainingError(
                f"{s.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient (limit "
                f"train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}); stopped at step "
                f"{s.global_step}. The weights were not updated by those steps; the last checkpoint is clean. "
                f"Lower optim.learning_rate, use bf16 instead of fp16, or inspect the data.")
        return {"loss": step_loss, "lr": lr, "grad_norm": norm, "skipped_samples": float(s.skipped_samples),
                "nonfinite_steps": float(s.nonfinite_steps), "empty_steps": float(s.empty_steps),
                "overflow_steps": float(s.overflow_steps), **extras}


def train(cfg: TrainConfig, fault: Callable[[str], None] | None = None,
          stop_at_micro_step: int | None = None) -> RunResult:
    """Run a training configuration (see :class:`Trainer`); returns when finished or stopped by a signal."""
    trainer = Trainer(cfg, fault=fault, stop_at_micro_step=stop_at_micro_step)
    trainer.setup()
    return trainer.run()
