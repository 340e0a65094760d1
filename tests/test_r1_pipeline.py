"""bench/r1_pipeline.py's record code: the table, the target checks and a failing stage's message (< 5 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.r1_pipeline import STAGE_OF_ROW, Pipeline, check_base_share, markdown, paired_differences, rows, targets  # noqa: E402

ROWS = ["1", "2", "3a", "3", "4", "5a", "5", "5b"]


def fake_eval(p1: float, p8: float, fmt: float, length: float) -> dict:
    return {"n": 200, "pass@1": p1, "pass@1_ci95": [p1 - 0.05, p1 + 0.05], "pass@8": p8, "format_rate": fmt,
            "readable_rate": fmt - 0.1, "mean_length_tokens": length}


def table_for(p1: dict[str, float], fmt: dict[str, float]):
    models = [(r, f"model {r}", Path(f"runs/x/{r}")) for r in ROWS]
    evals = {r: fake_eval(p1[r], min(1.0, 2 * p1[r]), fmt[r], 50 + i) for i, r in enumerate(ROWS)}
    stages = {s: {"seconds": 60.0 * (i + 1), "steps": 10 * (i + 1)}
              for i, s in enumerate(s for r in ROWS for s in STAGE_OF_ROW[r])}
    return rows(models, evals, stages, 8), stages


def test_table_carries_each_rows_figures_and_stage_minutes():
    p1 = dict(zip(ROWS, [0.10, 0.12, 0.20, 0.22, 0.25, 0.02, 0.08, 0.03]))
    table, stages = table_for(p1, dict.fromkeys(ROWS, 1.0))
    by_row = {t["row"]: t for t in table}
    assert [t["row"] for t in table] == ROWS
    assert by_row["4"]["pass@1"] == 0.25 and by_row["4"]["pass@8"] == 0.5
    # row 3a is made by two stages (sampling and SFT): both count, the last one's steps are shown
    expected = (stages["coldstart_sample"]["seconds"] + stages["coldstart_sft"]["seconds"]) / 60
    assert by_row["3a"]["stage_minutes"] == pytest.approx(expected)
    assert by_row["3a"]["steps"] == stages["coldstart_sft"]["steps"]
    md = markdown(table, 8).splitlines()
    assert len(md) == 2 + len(ROWS)
    assert md[6].startswith("| 4 | model 4 | 25.0% [20.0-30.0] | 50.0% | 100% | 90% | 54 |")


def test_targets_follow_the_figures():
    p1 = dict(zip(ROWS, [0.10, 0.12, 0.20, 0.11, 0.25, 0.02, 0.08, 0.03]))
    fmt = dict(zip(ROWS, [0.9, 0.9, 1.0, 1.0, 0.9, 0.5, 1.0, 0.6]))
    table, _ = table_for(p1, fmt)
    t = targets(table, total_min=16.0, limit_min=15.0)
    assert t["pipeline_at_least_r1zero"] == {"3": False, "4": True}
    assert t["pipeline_higher_format"] == {"3": True, "4": False}
    assert t["pipeline_more_readable"] == t["pipeline_higher_format"]  # readable = format - 0.1 in fake_eval
    assert t["distilled_beats_student_rl"] is True
    assert t["within_minutes"] is False
    p1["5b"] = 0.08  # a tie is not a win
    table, _ = table_for(p1, fmt)
    assert targets(table, 14.0, 15.0)["distilled_beats_student_rl"] is False


def test_failed_stage_names_the_stage_and_its_log(tmp_path):
    p = Pipeline(tmp_path / "work", threads=1, skip_existing=False)
    with pytest.raises(SystemExit, match=r"stage 'nothing' did not write .*missing.*its log is .*nothing\.log"):
        p.run("nothing", ["--version"], tmp_path / "missing")  # exits 0 but writes no output
    with pytest.raises(SystemExit, match=r"stage 'bad' exited with 2"):
        p.run("bad", ["eval", "--no-such-option"], tmp_path / "missing")
    assert not (tmp_path / "work" / "stages.json").exists()  # nothing recorded as done


def test_skip_existing_reuses_only_unchanged_stages_with_older_inputs(tmp_path):
    work = tmp_path / "work"
    out = tmp_path / "out.json"
    out.write_text("{}")
    p = Pipeline(work, threads=1, skip_existing=True)
    p.stages = {"train": {"status": "done", "command": "nanoseek train --x 1", "finished": 100.0},
                "eval": {"status": "done", "command": "nanoseek eval --ckpt A", "finished": 200.0}}
    assert p.done("eval", ["eval", "--ckpt", "A"], out, ("train",))
    assert not p.done("eval", ["eval", "--ckpt", "B"], out, ("train",))  # another command line
    assert not p.done("eval", ["eval", "--ckpt", "A"], tmp_path / "gone", ("train",))  # output missing
    p.stages["train"]["finished"] = 300.0  # its input was rebuilt after it: stale, even with the same command
    assert not p.done("eval", ["eval", "--ckpt", "A"], out, ("train",))
    assert not Pipeline(tmp_path / "w2", 1, skip_existing=False).done("eval", ["eval", "--ckpt", "A"], out, ())


def test_reused_base_must_have_the_asked_r1_share(tmp_path):
    (tmp_path / "run.json").write_text('{"config": {"data": {"r1_share": 0.05}}}')
    check_base_share(tmp_path, None)  # the default base: no check
    check_base_share(tmp_path, 0.05)
    with pytest.raises(SystemExit, match=r"pretrained with --data.r1_share 0.05, not --base-r1-share 0.5"):
        check_base_share(tmp_path, 0.5)
    with pytest.raises(SystemExit, match=r"--data.r1_share None"):
        check_base_share(tmp_path / "elsewhere", 0.05)  # no run.json: cannot tell, refuse


def test_gpu_scale_takes_the_gpu_run_settings_and_checks_a_reused_r1zero(tmp_path):
    """--scale gpu builds its stages from bench/r1_zero_gpu.py's settings; --r1zero must be a finished run."""
    from bench import r1_zero_gpu
    from bench.r1_pipeline import NEW_TOKENS, gpu_settings, main

    assert gpu_settings() == (r1_zero_gpu.PRETRAIN, r1_zero_gpu.RL)
    assert NEW_TOKENS["gpu"] == dict(zip(r1_zero_gpu.RL[::2], r1_zero_gpu.RL[1::2]))["--rl.max_new_tokens"]
    base = tmp_path / "base"
    (base / "checkpoints" / "step-000001").mkdir(parents=True)
    (base / "summary.json").write_text('{"step": 1, "minutes": 0.1}')
    with pytest.raises(SystemExit, match="--r1zero .* holds no summary.json"):
        main(["--scale", "gpu", "--base", str(base), "--r1zero", str(tmp_path / "missing"),
              "--work", str(tmp_path / "work")])


def test_paired_differences_compare_rows_problem_by_problem():
    """Rows scored on the same problems: the mean per-problem difference in points, with an interval that
    holds it; identical rows give exactly 0; a row without per-problem results is left out."""
    def ev(hits):
        return {"per_problem": [{"uid": f"p{i}", "pass@1": h} for i, h in enumerate(hits)]}

    r1zero = [0, 0, 1, 1] * 25
    evals = {"2": ev(r1zero), "3": ev([1, 0, 1, 1] * 25), "4": ev(r1zero), "3a": {"n": 100},
             "5": ev([1] * 100), "5b": ev([0] * 50 + [1] * 50)}
    d = paired_differences(evals)
    assert set(d) == {"3_vs_2", "4_vs_2", "5_vs_5b"}
    assert d["3_vs_2"]["points"] == pytest.approx(25.0) and d["3_vs_2"]["problems"] == 100
    lo, hi = d["3_vs_2"]["ci95_points"]
    assert 0 < lo <= 25.0 <= hi
    assert d["4_vs_2"] == {"points": 0.0, "ci95_points": [0.0, 0.0], "problems": 100}
    assert d["5_vs_5b"]["points"] == pytest.approx(50.0)

