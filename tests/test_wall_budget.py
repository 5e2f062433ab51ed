"""The wall budget's rule: the loop stops generating early enough for the wrap-up to fit."""

import pytest

from persd_online.wall_budget import SAFETY, WRAP_UP_S, last_full_eval, must_stop, reserve_s


def _eval(version, task_set, seconds, tasks, full=True):
    return {"adapter_version": version, "task_set": task_set, "eval_wall_s": seconds, "n_tasks": tasks,
            "full": full}


def test_the_last_full_evaluation_is_what_the_final_one_will_cost():
    evals = [_eval(0, "mbpp:test", 100.0, 100), _eval(0, "humaneval", 50.0, 20),
             _eval(3, "mbpp:test", 10.0, 20, full=False)]
    assert last_full_eval(evals) == (150.0, 120)  # the progress evaluation of v3 is not the final one's cost
    assert last_full_eval([]) == (0.0, 0)
    # a version evaluated twice (a resumed run) counts once per set
    assert last_full_eval(evals + [_eval(6, "mbpp:test", 80.0, 100), _eval(6, "mbpp:test", 90.0, 100)]) == (90.0, 100)


def test_reserve_covers_the_final_evaluation_the_trained_task_check_and_a_running_call():
    assert reserve_s(0.0, 0, 0, 0.0) == WRAP_UP_S
    # 100 s for 100 tasks: 1 s a task; 10 trained tasks are generated twice; a 15 s call may be running
    assert reserve_s(100.0, 100, 10, 15.0) == pytest.approx(SAFETY * (100 + 20 + 15) + WRAP_UP_S)
    assert reserve_s(100.0, 100, 11, 15.0) > reserve_s(100.0, 100, 10, 15.0)


def test_stop_when_the_wrap_up_would_overrun():
    assert not must_stop(100.0, None, 10_000.0)  # no budget, no stop
    assert not must_stop(600.0, 840.0, 200.0)
    assert must_stop(640.0, 840.0, 200.0)
    # a run that keeps this rule ends within the budget when its estimates hold
    wall, budget, reserve = 0.0, 840.0, reserve_s(150.0, 100, 30, 20.0)
    while not must_stop(wall, budget, reserve):
        wall += 20.0  # one generation call
    actual_wrap_up = 150.0 + 2 * 30 * 1.5 + 20.0
    assert wall + actual_wrap_up <= budget * 1.1
