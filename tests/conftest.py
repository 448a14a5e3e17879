"""Shared test fixtures: the reference parity fixtures and small helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


FIXTURES = REPO / "tests" / "fixtures"


def reference_dir() -> Path:
    """``$ANYTEXT2_REFERENCE_DIR``, else ``tests/fixtures``: the parity fixture ``tiny/`` recorded from the original
    code and the two sd15 manifests (state-dict keys and shapes, Linear/Conv2d modules)."""
    return Path(os.environ.get("ANYTEXT2_REFERENCE_DIR", FIXTURES))


@pytest.fixture(scope="session")
def tiny_fixture_dir() -> Path:
    d = reference_dir() / "tiny"
    if not (d / "outputs.safetensors").is_file():
        raise FileNotFoundError(
            f"parity fixtures not found in {d}: set ANYTEXT2_REFERENCE_DIR to the folder holding tiny/")
    return d


@pytest.fixture(scope="session")
def tiny_fixture(tiny_fixture_dir):
    """(state_dict, inputs, outputs, meta) of the tiny parity fixture."""
    from safetensors.torch import load_file

    d = tiny_fixture_dir
    return (load_file(d / "state_dict.safetensors"), load_file(d / "inputs.safetensors"),
            load_file(d / "outputs.safetensors"), json.loads((d / "meta.json").read_text()))


def assert_close_ref(ours, ref, name: str = "") -> None:
    """The project's parity tolerance: max|ours - ref| <= 5e-5 * max(1, max|ref|)."""

    ours = ours.detach().float().cpu()
    ref = ref.float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    tol = 5e-5 * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"{name}: max abs error {err:.3e} > tolerance {tol:.3e}"
