"""The experiment's budget matching, resume and report, without engines (the smoke test runs the real ones)."""

import json

import pytest

from persd_online import experiment
from persd_online.config import ConfigError, load_config
from persd_online.experiment import ArmResult, check_plan, fingerprint, load_finished, offline_config, take_within
from persd_online.experiment_report import comparisons, markdown, write_report
from persd_online.heldout import SetScore


def _score(name: str, outcomes: dict[str, float]) -> SetScore:
    mean = sum(outcomes.values()) / len(outcomes)
    return SetScore(task_set=name, n_tasks=len(outcomes), n_samples=1, temperature=0.0, pass1=mean, ci_low=mean,
                    ci_high=mean, wall_s=1.0, generated_tokens=10, outcomes=outcomes)


def _result(config, arm: str, passed: set[int], n: int = 100, calls: int = 0) -> ArmResult:
    outcomes = {f"T{i}": float(i in passed) for i in range(n)}
    return ArmResult(arm=arm, fingerprint=fingerprint(offline_config(config), arm), teacher="none",
                     teacher_calls=calls, examples=calls, scores=[_score("mbpp:test", outcomes)])


def test_take_within_matches_examples_or_calls():
    rows = [(["a"], 1), (["b", "c"], 2), ([], 3), (["d"], 1)]  # (examples of a task, teacher calls spent)
    assert take_within(rows, 3, lambda r: len(r[0])) == rows[:3]  # 3 examples: the empty task costs nothing
    assert take_within(rows, 3, lambda r: r[1]) == rows[:2]  # 3 calls
    assert take_within(rows, 0, lambda r: r[1]) == []
    assert take_within(rows, 100, lambda r: r[1]) == rows


def test_impossible_plans_are_refused_before_anything_runs():
    config = load_config(None, ["experiment.budget=50", "tasks.limit=40"])
    with pytest.raises(ConfigError, match="at most 40"):
        check_plan(config, 40)
    check_plan(load_config(None, ["experiment.budget=40"]), 40)
    check_plan(load_config(None, ["experiment.budget=500", "experiment.arms=[base]"]), 40)  # nothing trains
    with pytest.raises(ConfigError, match="twice"):
        check_plan(load_config(None, ["experiment.arms=[base, base]"]), 40)
    with pytest.raises(ConfigError, match="experiment.arms"):
        load_config(None, ["experiment.arms=[base, nosuch]"])


def test_settings_that_change_an_arm_change_its_fingerprint_only():
    a = offline_config(load_config(None, []))
    b = offline_config(load_config(None, ["trainer.lr=1e-3"]))
    assert fingerprint(a, "base") == fingerprint(b, "base")  # base trains nothing
    assert fingerprint(a, "stand") != fingerprint(b, "stand")
    c = offline_config(load_config(None, ["experiment.online_max_wall_s=10"]))
    assert fingerprint(a, "stand") == fingerprint(c, "stand") and fingerprint(a, "online") != fingerprint(c, "online")


def test_resume_skips_finished_arms(tmp_path, monkeypatch):
    config = load_config(None, [f"runs_dir={tmp_path}", "experiment.arms=[base, stand]", "tasks.limit=10",
                                "experiment.budget=5", "experiment.heldout=[mbpp:test]",
                                "experiment.heldout_limit=100"])
    out = tmp_path / "results"
    (out / "arms").mkdir(parents=True)
    for arm, passed in (("base", {1, 2}), ("stand", {1, 2, 3})):
        (out / "arms" / f"{arm}.json").write_text(_result(config, arm, passed).model_dump_json())
    stale = _result(config, "stand", set()).model_copy(update={"fingerprint": "other-settings"})
    assert set(load_finished(out, config)) == {"base", "stand"}

    def no_arm_may_run(*args, **kwargs):
        raise AssertionError("a finished arm was run again")

    monkeypatch.setattr(experiment, "ProcessPoolExecutor", no_arm_may_run)
    results = experiment.run_experiment(config, out)
    assert list(results) == ["base", "stand"]
    assert json.loads((out / "experiment.json").read_text())["arms"]["stand"]["scores"][0]["pass1"] == 0.03
    assert (out / "experiment.png").stat().st_size > 10_000
    # a result made with other settings is not reused
    (out / "arms" / "stand.json").write_text(stale.model_dump_json())
    assert set(load_finished(out, config)) == {"base"}


def test_report_compares_arms_pairwise_with_verdicts(tmp_path):
    config = load_config(None, ["experiment.arms=[base, stand, inpd]"])
    results = {"base": _result(config, "base", set(range(5)), n=300),
               "stand": _result(config, "stand", set(range(45)), n=300, calls=120),  # +40 tasks, none lost
               "inpd": _result(config, "inpd", set(range(6)), n=300, calls=120)}  # +1 task
    rows = comparisons(results)
    by = {(r["a"], r["b"], r["task_set"]): r for r in rows}
    assert by[("base", "stand", "all")]["verdict"] == "better"
    assert by[("base", "inpd", "all")]["verdict"] == "within noise"
    assert by[("stand", "inpd", "all")]["verdict"] == "worse"
    assert by[("base", "stand", "mbpp:test")]["improved"] == 40
    table = markdown(results, rows, config)
    assert "stand better" in table and "within noise" in table and "| inpd |" in table
    paths = write_report(results, config, tmp_path)
    assert all(p.is_file() for p in paths)
