"""The trainer's example buffer and its replay buffer, without a model: staleness and duplicate drops, replay
shares and counts, state round trips."""

from __future__ import annotations

import json
from collections import Counter

from persd_online.example_buffer import ExampleBuffer
from persd_online.records import Example
from persd_online.replay import ReplayBuffer


def made(n: int, version: int | None = None, prefix: str = "e") -> list[Example]:
    return [Example(example_id=f"{prefix}{i}", method="stand", task_id=f"t{i}", prompt="p", completion="c",
                    adapter_version=version) for i in range(n)]


def buffer(step: int = 4, replay_fraction: float = 0.5, max_staleness: int = 1,
           stale_to_replay: bool = False) -> ExampleBuffer:
    return ExampleBuffer(step, replay_fraction, max_staleness, ReplayBuffer(capacity=16, max_reuse=3, seed=1),
                         stale_to_replay)


def ids(examples: list[Example]) -> list[str]:
    return [e.example_id for e in examples]


def test_stale_and_already_trained_examples_are_dropped_and_counted() -> None:
    b = buffer(replay_fraction=0.0)
    old, recent, offline = made(3, version=1, prefix="old"), made(3, version=2, prefix="new"), made(1, prefix="off")
    b.add(old + recent + offline)
    draw = b.draw(version=3)  # 3 - 1 > 1: stale; 3 - 2 = 1: still fresh; no version (offline data): never stale
    assert ids(draw.fresh) == ["new0", "new1", "new2", "off0"] and draw.replayed == []
    assert (draw.stale_dropped, draw.duplicates_dropped) == (3, 0)
    b.trained(draw.fresh)
    b.add(recent[:1] + made(1, version=3, prefix="next"))
    again = b.draw(version=3)
    assert ids(again.fresh) == ["next0"] and (again.stale_dropped, again.duplicates_dropped) == (0, 1)


def test_a_stale_verified_label_reaches_replay_not_the_floor() -> None:
    b = buffer(step=4, replay_fraction=0.5, stale_to_replay=True)
    b.add(made(2, version=0, prefix="late"))
    draw = b.draw(version=3)  # 3 - 0 > 1: too stale to train fresh, still a correct label
    assert draw.fresh == [] and (draw.stale_dropped, draw.stale_replayed) == (0, 2)
    assert "late0" in b.replay and "late1" in b.replay
    b.add(made(3, version=3, prefix="new"))
    trained = b.draw(version=3)
    assert ids(trained.fresh) == ["new0", "new1"] and sorted(ids(trained.replayed)) == ["late0", "late1"]
    uses = Counter()
    for _ in range(5):  # unused when it entered: max_reuse (3) draws in all, the first above included
        b.add(made(1, version=3, prefix=f"more{_}"))
        uses.update(ids(b.draw(version=3).replayed))
    assert uses["late0"] == uses["late1"] == 2


def test_a_draw_with_no_usable_fresh_example_takes_nothing_from_replay() -> None:
    b = buffer()
    b.trained(made(4, prefix="r"))
    b.add(made(2, version=0))
    draw = b.draw(version=5)
    assert draw.fresh == [] and draw.replayed == [] and draw.stale_dropped == 2
    assert len(b.replay) == 4 and b.fresh == []


def test_replay_takes_its_share_once_warm_and_counts_uses() -> None:
    b = buffer(step=4, replay_fraction=0.5)  # max_reuse 3: trained once fresh, replayed at most twice
    b.add(made(3))
    assert b.replay_share() == 0 and not b.ready()  # cold: a step wants 4 fresh examples
    b.add(made(1, prefix="x"))
    first = b.draw(version=0)
    assert len(first.fresh) == 4 and first.replayed == []
    b.trained(first.fresh)
    assert b.replay_share() == 2 and len(b.replay) == 4
    uses: Counter[str] = Counter()
    for k in range(12):
        b.add(made(2, prefix=f"g{k}-"))
        assert b.ready()
        draw = b.draw(version=0)
        assert len(draw.fresh) == 2 and len(draw.replayed) == 2
        assert not set(ids(draw.replayed)) & set(ids(draw.fresh))  # an example joins replay after its step
        uses.update(ids(draw.replayed))
        b.trained(draw.fresh)
    assert sum(uses.values()) == 24 and max(uses.values()) == 2


def test_state_round_trips_through_json_and_draws_the_same() -> None:
    b = buffer()
    b.add(made(4))
    b.trained(b.draw(version=0).fresh)
    b.add(made(5, prefix="p"))
    restored = buffer()
    restored.load_state(json.loads(json.dumps(b.state())))
    assert restored.seen == b.seen and ids(restored.fresh) == ids(b.fresh)
    for _ in range(2):
        x, y = b.draw(version=0), restored.draw(version=0)
        assert ids(x.fresh) == ids(y.fresh) and ids(x.replayed) == ids(y.replayed)


def test_adopted_ids_leave_the_queue_for_replay() -> None:
    b = buffer()
    b.add(made(3))
    b.adopt({"e0", "e2", "elsewhere"})
    assert ids(b.fresh) == ["e1"] and len(b.replay) == 2 and {"e0", "e2", "elsewhere"} <= b.seen
    b.add(made(1))  # e0 again: trained already
    assert b.draw(version=0).duplicates_dropped == 1


def test_replay_buffer_caps_reuse_size_and_duplicates() -> None:
    examples = made(5)
    replay = ReplayBuffer(capacity=3, max_reuse=3, seed=1)
    for example in examples + examples[-1:]:  # the last one twice: held once, its use count unchanged
        replay.add(example)
    assert len(replay) == 3 and "e0" not in replay and "e1" not in replay  # the oldest are evicted
    state = json.loads(json.dumps(replay.state()))
    draws = [e.example_id for _ in range(10) for e in replay.sample(3)]
    assert sorted(set(draws)) == ["e2", "e3", "e4"]
    assert all(draws.count(i) == 2 for i in set(draws))  # first training + 2 replays = max_reuse
    assert len(replay) == 0
    restored = ReplayBuffer(capacity=3, max_reuse=3)
    restored.load_state(state)
    assert [e.example_id for _ in range(10) for e in restored.sample(3)] == draws  # same items, same generator
