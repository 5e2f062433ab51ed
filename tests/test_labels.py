"""Distinct labels: counted once per (task, completion), across resumes."""

import json

from persd_online.labels import Labels
from persd_online.records import Example


def _example(task, completion, example_id="e"):
    return Example(example_id=example_id, method="persd", task_id=task, prompt="p", completion=completion)


def test_same_task_and_completion_is_one_label_whatever_the_prompt_or_id():
    labels = Labels()
    assert labels.add([_example("t1", "def f(): pass", "a")]) == 1
    assert labels.add([_example("t1", "def f(): pass", "b")]) == 0  # the oracle's reference, again
    assert labels.add([_example("t2", "def f(): pass"), _example("t1", "def f(): return 1")]) == 2
    assert len(labels) == 3


def test_labels_survive_a_checkpoint():
    labels = Labels()
    labels.add([_example("t1", "x"), _example("t2", "y")])
    again = Labels(json.loads(json.dumps(labels.keys())))
    assert len(again) == 2 and again.add([_example("t2", "y")]) == 0
