"""Shared pieces of the trainer tests: a tiny synthetic dataset (built once per session), tiny configs, subprocess
runs of the CLI, and readers for what a run leaves behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_DATASETS: dict[tuple, Path] = {}
THREADS = 1
"""Intra-op threads of every training in these tests, in-process and in subprocesses. One thread keeps a tiny model
fast on a busy machine (two OpenMP threads spin against other processes: 25x slower measured on 2 shared cores) and
makes in-process and subprocess runs bit-comparable."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Module-wide: import it into a test module (``from distill_helpers import one_thread``) to run it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(n)


def tiny_dataset(root: Path, num: int = 8, size: int = 128, max_lines: int = 1) -> Path:
    """A synthetic AnyWord dataset (``num`` images with 1..``max_lines`` lines); cached per session by its recipe."""
    key = (num, size, max_lines)
    if key in _DATASETS and _DATASETS[key].is_file():
        return _DATASETS[key]
    from anytext2_lcm.data.synthetic import SynthConfig, write_dataset

    out = Path(root) / f"synth_{num}_{size}_{max_lines}"
    paths = write_dataset(SynthConfig(num=num, size=size, min_lines=1, max_lines=max_lines, seed=0), out)
    _DATASETS[key] = Path(paths[0])
    return _DATASETS[key]


def base_config(data_json: Path, out_dir: Path) -> dict:
    """The tests' tiny run: 64 px, one line, batch 1, rank-4 LoRA, fp32 on the CPU, no logging extras."""
    return {
        "method": "lcm",
        "output_dir": str(out_dir),
        "model": {"teacher": None, "preset": "tiny", "init": "default", "init_seed": 0},
        "data": {"json_paths": [str(data_json)], "image_size": 64, "max_lines": 1, "seed": 0,
                 "font_hint_prob": 0.8, "mask_img_prob": 0.5},
        "lora": {"rank": 4, "alpha": 4, "targets": "lcm"},
        "distill": {"guidance_scale_range": [7.0, 8.0]},
        "optim": {"learning_rate": 1e-3, "lr_scheduler": "constant", "lr_warmup_steps": 0},
        "train": {"max_steps": 4, "batch_size": 1, "gradient_accumulation_steps": 1, "num_workers": 0, "seed": 0},
        "checkpoint": {"every_n_steps": 0, "keep_last": 3, "resume": None},
        "validation": {"every_n_steps": 0, "image_size": 64},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


def make_config(data_json: Path, out_dir: Path, *overrides: str):
    from anytext2_lcm.distill.config import load_config

    return load_config(None, list(overrides), base=base_config(data_json, out_dir))


def write_yaml(cfg_dict: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg_dict))
    return path


def cli_env(threads: int | None = THREADS) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "anytext2_lcm.cli", *args]


def start_cli(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``anytext2-lcm ARGS`` in the background, stdout+stderr to ``log``."""
    f = open(log, "ab")
    return subprocess.Popen(cli_command(*args), stdout=f, stderr=subprocess.STDOUT, env=env or cli_env(),
                            cwd=str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(rank: int, world: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """One rank of a CPU process group, started as torchrun would (the env:// rendezvous Accelerate reads)."""
    env = cli_env(threads=1)
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "ACCELERATE_USE_CPU": "1"})
    return start_cli(*args, log=log, env=env)


def metrics(out_dir: Path) -> list[dict]:
    f = Path(out_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for ln in f.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:  # a line being written right now (or torn by a kill)
            pass
    return out


def losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in metrics(out_dir)]


def kill_tree(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL a launcher and every process below it, at once, and wait until all are gone. torch's elastic launcher
    starts each rank in a session of its own, so killing the launcher's process group alone leaves the ranks running
    (they would go on writing checkpoints beside whatever the test does next). psutil comes with accelerate."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    proc.wait(timeout)
    assert not alive, f"processes still alive after SIGKILL: {[p.pid for p in alive]}"


def wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, what: str = "condition") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.iterdir()) if root.is_dir() else []


def trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt) / "trainable.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def perturb_lora_b(model, seed: int, std: float = 0.05):
    """Set every lora_B to N(0, std²) from its own generator (``seed``): a "trained" student that differs from its
    teacher (lora_B starts at zero). Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def lora_student(cfg, method_cls, lora_b_std: float = 0.05):
    """(model, method): a tiny teacher with the LoRA of ``cfg`` set up by ``method_cls`` (LCMMethod, PCMMethod);
    lora_B randomised (seed 0) so that the student differs from the teacher."""
    from anytext2_lcm.distill.components import build_teacher

    model = build_teacher(cfg.model)
    method = method_cls(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        method.configure_model(model)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0.0, lora_b_std)
    method.set_train_mode(model)
    return model, method


def first_batch(cfg, model, epoch: int = 0):
    """(raw batch, TrainBatch) of the first batch of ``cfg``'s loader in epoch 0, prepared for ``model``."""
    from anytext2_lcm.distill.batch import prepare_batch
    from anytext2_lcm.distill.data import build_loader

    loader = build_loader(cfg)
    loader.set_epoch(0)
    batch = next(iter(loader))
    return batch, prepare_batch(model, batch, cfg.train.seed, epoch, "cpu")
