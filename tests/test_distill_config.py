"""The training config: a table of invalid configurations, each rejected before any model is built with a message
that names the field; YAML examples, overrides and the CLI path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from anytext2_lcm.config import ConfigError
from anytext2_lcm.distill.config import TrainConfig, config_from_dict, load_config

from distill_helpers import REPO, base_config, make_config, write_yaml

# (override(s), field named in the message)
INVALID = [
    (["lora.rank=-4"], "lora.rank"),
    (["lora.rank=0"], "lora.rank"),
    (["lora.alpha=0"], "lora.alpha"),
    (["lora.targets=no-such-preset"], "lora.targets"),
    (["data.json_paths=[]"], "data.json_paths"),
    (["data.json_paths=[/nonexistent/anyword.json]"], "data.json_paths"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["distill.guidance_scale_range=[8.0, 7.0]"], "distill.guidance_scale_range"),
    (["distill.guidance_scale_range=[0.5, 2.0]"], "distill.guidance_scale_range"),
    (["train.max_steps=0"], "train.max_steps"),
    (["data.image_size=100"], "data.image_size"),
    (["validation.sampler=euler"], "validation.sampler"),
    (["validation.steps=[0]"], "validation.steps"),
    (["validation.image_size=96"], "validation.image_size"),
    (["method=dmd"], "method"),
    (["optim.learning_rate=0"], "optim.learning_rate"),
    (["optim.lr_scheduler=exponential"], "optim.lr_scheduler"),
    (["optim.lr_warmup_steps=-1"], "optim.lr_warmup_steps"),
    (["optim.max_grad_norm=-1"], "optim.max_grad_norm"),
    (["optim.optimizer=sgd"], "optim.optimizer"),
    (["distill.loss=l1"], "distill.loss"),
    (["distill.huber_c=0"], "distill.huber_c"),
    (["distill.num_ddim_timesteps=30"], "distill.num_ddim_timesteps"),
    (["distill.text_loss_weight=-1"], "distill.text_loss_weight"),
    (["model.preset=sdxl"], "model.preset"),
    (["model.teacher=/nonexistent/teacher"], "model.teacher"),
    (["checkpoint.resume=/nonexistent/checkpoint-000010"], "checkpoint.resume"),
    (["checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps"),
    (["train.num_workers=-1"], "train.num_workers"),
    (["train.max_consecutive_nonfinite=0"], "train.max_consecutive_nonfinite"),
    (["lora.train_embedding_manager=true"], "lora.train_embedding_manager"),
    (["teacher_training.trainable=[vae]"], "teacher_training.trainable"),
    (["train.no_such_field=1"], "train.no_such_field"),
    (["no_such_section.x=1"], "no_such_section"),
    (["method=teacher", "validation.every_n_steps=5", "validation.sampler=lcm"], "validation.sampler"),
]


@pytest.fixture()
def data_json(tmp_path) -> Path:
    p = tmp_path / "anyword.json"
    p.write_text('{"data_root": ".", "data_list": []}')
    return p


def test_base_config_is_valid(data_json, tmp_path):
    cfg = load_config(None, [], base=base_config(data_json, tmp_path / "out"))
    assert isinstance(cfg, TrainConfig)
    assert cfg.lora.rank == 4 and cfg.distill.guidance_scale_range == (7.0, 8.0)
    # Round trip through plain data keeps every value.
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides,field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_config_is_rejected_naming_the_field(overrides, field, data_json, tmp_path, monkeypatch):
    import anytext2_lcm.models.anytext2 as m

    def no_model(*a, **k):
        raise AssertionError("a model was built before the config was validated")

    monkeypatch.setattr(m.AnyText2, "__init__", no_model)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, base=base_config(data_json, tmp_path / "out"))
    elapsed = time.perf_counter() - t0
    assert str(e.value).startswith(field), f"message does not start with {field!r}: {e.value}"
    assert elapsed < 0.5, f"validation took {elapsed:.2f}s"


def test_table_is_large_enough():
    assert len({f for _, f in INVALID}) >= 15


@pytest.mark.parametrize("name", ["distill_tiny.yaml", "distill_sd15.yaml", "pcm_sd15.yaml", "teacher_tiny.yaml"])
def test_example_configs_parse(name):
    cfg = load_config(REPO / "configs" / name, check_files=False)
    assert cfg.method == {"distill": "lcm", "pcm": "pcm", "teacher": "teacher"}[name.split("_")[0]]
    assert cfg.train.max_steps >= 1


def test_example_accelerate_config_parses():
    from accelerate.commands.config.config_args import ClusterConfig

    c = ClusterConfig.from_yaml_file(REPO / "configs" / "accelerate_multinode.yaml")
    assert c.distributed_type == "MULTI_GPU" and c.num_machines == 2 and c.num_processes == 16
    assert c.main_process_port == 29500 and c.mixed_precision == "no"


def test_overrides_parse_yaml_values(data_json, tmp_path):
    cfg = load_config(None, ["distill.guidance_scale_range=[7.5, 7.5]", "optim.max_grad_norm=null",
                             "validation.steps=[1, 2, 4]", "train.mixed_precision=bf16"],
                      base=base_config(data_json, tmp_path / "out"))
    assert cfg.distill.guidance_scale_range == (7.5, 7.5)
    assert cfg.optim.max_grad_norm is None
    assert cfg.validation.steps == (1, 2, 4)
    assert cfg.train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["train.max_steps"], base=base_config(data_json, tmp_path / "out"))


def test_cli_rejects_before_building(data_json, tmp_path, monkeypatch, capsys):
    import anytext2_lcm.models.anytext2 as m
    from anytext2_lcm.cli import main

    monkeypatch.setattr(m.AnyText2, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    f = write_yaml(base_config(data_json, tmp_path / "out"), tmp_path / "c.yaml")
    assert main(["distill", "--config", str(f), "--set", "train.batch_size=0"]) == 2
    assert "train.batch_size=0" in capsys.readouterr().err
    assert main(["distill", "--config", str(f), "lora.alpha=0"]) == 2
    assert "lora.alpha" in capsys.readouterr().err
    assert main(["distill", "--config", str(f), "--resume", str(tmp_path / "nope")]) == 2
    assert "checkpoint.resume" in capsys.readouterr().err
    assert main(["distill", "--config", str(f), "method=teacher"]) == 2
    assert "train-teacher" in capsys.readouterr().err
    assert main(["distill", "--config", str(f), "--dry-run", "train.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out


def test_lr_schedule_steps_span_the_schedule(tmp_path):
    """A run that stops at 40 steps of a 100-step cosine schedule follows the longer schedule (hand math:
    lr_k = lr · ½(1 + cos(π (k − w) / (S − w))) after w warm-up steps); without it the schedule ends at max_steps."""
    import math

    import torch

    from anytext2_lcm.distill.trainer import lr_schedule

    (tmp_path / "d.json").write_text('{"data_list": []}')

    def lrs(*overrides):
        cfg = make_config(tmp_path / "d.json", tmp_path / "out", "optim.lr_scheduler=cosine",
                          "optim.learning_rate=0.1", "optim.lr_warmup_steps=10", "train.max_steps=40", *overrides)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = lr_schedule(opt, cfg)
        out = []
        for _ in range(40):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    long = lrs("optim.lr_schedule_steps=100")
    assert long[5] == pytest.approx(0.1 * 5 / 10)
    assert long[30] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 20 / 90)))
    short = lrs()
    assert short[30] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 20 / 30)))
    with pytest.raises(Exception, match="lr_schedule_steps"):
        make_config(tmp_path / "d.json", tmp_path / "out", "optim.lr_schedule_steps=0")
