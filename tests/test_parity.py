"""Parity with the ORIGINAL AnyText2: replay the reference fixture and compare all its outputs."""

import json
import subprocess
import sys

import torch

from anytext2_lcm.parity import compare, compute_outputs, format_rows, load_fixture


def test_every_fixture_output_within_tolerance(tiny_fixture_dir):
    model, inputs, refs, meta = load_fixture(tiny_fixture_dir)
    rows = compare(compute_outputs(model, inputs, meta), refs)
    assert len(rows) == len(refs) == len(meta["output_shapes"])
    bad = [r for r in rows if not r.ok]
    assert not bad, format_rows(bad)


def test_compare_flags_missing_and_wrong_outputs():
    refs = {"a": torch.ones(2, 2), "b": torch.zeros(3), "c": torch.full((2,), 100.0)}
    ours = {"a": torch.ones(2, 2) + 1e-3, "c": torch.full((2,), 100.0 + 4e-3)}
    rows = {r.name: r for r in compare(ours, refs)}
    assert not rows["a"].ok and rows["a"].max_abs_err > 5e-5
    assert not rows["b"].ok and rows["b"].note == "not produced"
    assert rows["c"].ok and abs(rows["c"].tolerance - 5e-3) < 1e-12  # relative: 5e-5 * max|ref|


def test_parity_cli_exit_status(tiny_fixture_dir, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "anytext2_lcm.cli", "parity", str(tiny_fixture_dir)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "67/67 outputs within tolerance" in ok.stdout
    # A fixture whose reference output was altered must fail with a non-zero status.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "fixture"
    bad.mkdir()
    for name in ("config.yaml", "state_dict.safetensors", "inputs.safetensors", "meta.json"):
        (bad / name).write_bytes((tiny_fixture_dir / name).read_bytes())
    outs = load_file(str(tiny_fixture_dir / "outputs.safetensors"))
    outs["eps_cond"] = outs["eps_cond"] + 1e-2
    save_file(outs, str(bad / "outputs.safetensors"))
    res = subprocess.run([sys.executable, "-m", "anytext2_lcm.cli", "parity", str(bad)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "eps_cond " in res.stdout and " NO" in res.stdout


def test_fixture_run_params_are_read_not_assumed(tiny_fixture_dir, tmp_path):
    """Changing a run parameter in meta.json changes what is computed (here the single-step CFG scale)."""
    model, inputs, refs, meta = load_fixture(tiny_fixture_dir)
    meta2 = json.loads(json.dumps(meta))
    meta2["run_params"]["single_step_cfg_scale"] = 2.0
    out = compute_outputs(model, {k: inputs[k] for k in inputs if k != "ddim_x_T"}, meta2)
    expect = out["eps_uncond"] + 2.0 * (out["eps_cond"] - out["eps_uncond"])
    torch.testing.assert_close(out["eps_cfg"], expect)
    assert (out["eps_cfg"] - refs["eps_cfg"]).abs().max() > 1e-3
