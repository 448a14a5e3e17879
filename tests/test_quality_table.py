"""The quality benchmark's run list and table (evaluate/quality.py): each student is compared with the undistilled
teacher under its own sampling, and the ratios are the hand-computed ones."""

from __future__ import annotations

from anytext2_lcm.defaults import Sampling
from anytext2_lcm.evaluate.quality import Student, control_names, format_table, quality_runs, quality_table

LCM = Sampling("lcm", 4, 1.0, {"original_steps": 20})
PCM_CFG = Sampling("pcm", 4, 7.5, {"num_phases": 4, "original_steps": 20})


def _students():
    return [Student("lcm", LCM), Student("lcm+ocr", LCM), Student("pcm-cfgfree", PCM_CFG)]


def test_students_sharing_a_sampling_share_one_control_and_others_get_their_own():
    assert control_names(_students()) == {"lcm": "undistilled", "lcm+ocr": "undistilled",
                                          "pcm-cfgfree": "undistilled-pcm-cfgfree"}
    runs = {r.name: r for r in quality_runs(_students(), [1, 4])}
    # 1 teacher + 3 students x 2 + ddim x 2 + 2 controls x 2
    assert len(runs) == 1 + 6 + 2 + 4
    ctrl = runs["undistilled-pcm-cfgfree@4"]
    # the control runs the student's sampler and options, less the phase count (the weights were trained with none)
    assert (ctrl.sampler, ctrl.steps, ctrl.cfg, dict(ctrl.options)) == ("pcm", 4, 7.5, {"original_steps": 20})
    assert not ctrl.lora and not runs["undistilled@1"].lora and runs["pcm-cfgfree@1"].lora
    assert runs["undistilled@1"].sampler == "lcm" and runs["undistilled@1"].cfg == 1.0


def test_pcm_students_with_other_phase_counts_share_one_control():
    # the phase count only validates the step count: 4 and 8 phases visit the same timesteps at k = 1, 2, 4, 8
    from anytext2_lcm.samplers import make_sampler

    for k in (1, 2, 4, 8):
        assert make_sampler("pcm", num_phases=4).timesteps(k) == make_sampler("pcm", num_phases=8).timesteps(k)
    pcm8 = Sampling("pcm", 8, 7.5, {"num_phases": 8, "original_steps": 20})
    students = [*_students(), Student("pcm-cfgfree-8ph", pcm8)]
    names = control_names(students)
    assert names["pcm-cfgfree-8ph"] == names["pcm-cfgfree"] == "undistilled-pcm-cfgfree"
    # a different CFG is a different control
    other = Sampling("pcm", 8, 5.0, {"num_phases": 8, "original_steps": 20})
    assert control_names([*students, Student("x", other)])["x"] == "undistilled-x"
    runs = [r.name for r in quality_runs(students, [8])]
    assert runs.count("undistilled-pcm-cfgfree@8") == 1 and "undistilled-pcm-cfgfree-8ph@8" not in runs
    # a 3-phase and a 4-phase student evaluated at 3 and 4 steps: the shared control accepts both step counts
    three = Student("pcm3", Sampling("pcm", 3, 7.5, {"num_phases": 3, "original_steps": 20}))
    four = Student("pcm4", Sampling("pcm", 4, 7.5, {"num_phases": 4, "original_steps": 20}))
    for r in quality_runs([three, four], [3, 4]):
        if r.name.startswith("undistilled"):
            make_sampler(r.sampler, **dict(r.options)).timesteps(r.steps)  # raises if the step count is refused


def _run(name, sen_acc, ned, mse, lines=10):
    return {"name": name, "cfg": 7.5, "steps": 20, "ocr": {"Latin": {"lines": lines, "sen_acc": sen_acc, "ned": ned}},
            "fidelity_to_teacher": None if mse is None else {"latent_mse": mse},
            "seconds_per_image": {"mean": 0.5}, "speedup_vs_teacher": 2.0}


def test_table_ratios_are_to_the_teacher_to_ddim_and_to_the_students_own_control():
    res = {"runs": [_run("teacher", 0.8, 0.9, None), _run("lcm@1", 0.4, 0.6, 3.0), _run("lcm+ocr@1", 0.6, 0.9, 1.0),
                    _run("pcm-cfgfree@1", 0.7, 0.81, 2.0), _run("ddim@1", 0.0, 0.1, 4.0),
                    _run("undistilled@1", 0.1, 0.3, 2.0), _run("undistilled-pcm-cfgfree@1", 0.2, 0.4, 5.0)]}
    students = _students()
    rows = {r["run"]: r for r in quality_table(res, [s.label for s in students], [1], "Latin",
                                               control_names(students))}
    assert list(rows) == ["lcm", "lcm+ocr", "pcm-cfgfree", "ddim", "undistilled", "undistilled-pcm-cfgfree"]
    assert abs(rows["pcm-cfgfree"]["sen_acc_retention"] - 0.875) < 1e-12  # 0.7 / 0.8
    assert abs(rows["pcm-cfgfree"]["ned_retention"] - 0.9) < 1e-12  # 0.81 / 0.9
    assert rows["pcm-cfgfree"]["latent_mse_ratio"] == 0.5  # 2 / ddim's 4
    assert rows["pcm-cfgfree"]["mse_vs_undistilled"] == 0.4  # 2 / its own control's 5, not the LCM control's 2
    assert rows["lcm"]["mse_vs_undistilled"] == 1.5 and rows["lcm+ocr"]["mse_vs_undistilled"] == 0.5  # ÷ 2
    assert rows["undistilled"]["mse_vs_undistilled"] is None and rows["ddim"]["control"] is None
    md = format_table(res, list(rows.values()))
    assert "| pcm-cfgfree | 1 | 0.700 | 0.810 | 0.875 | 0.900 | 2.000 | 0.50 | 0.40 | 0.50 | 2.0 |" in md
    # without a control map every student is compared with the first control, as a one-student run (the demo) is
    rows1 = {r["run"]: r for r in quality_table(res, ["pcm-cfgfree"], [1])}
    assert rows1["pcm-cfgfree"]["mse_vs_undistilled"] == 1.0 and "undistilled-pcm-cfgfree" not in rows1
