"""The trainer's example buffer: which examples the next optimizer step trains on.

Fresh examples wait in arrival order. A step draws `step_examples` examples (`draw`): a `replay_fraction`
share from the replay buffer (`replay.py`) once it holds any, the rest fresh, oldest first. On the way, fresh
examples whose id was trained already are dropped, and those stale against the trainer's published version
(`staleness.is_stale`) go to the replay buffer unused (`stale_to_replay`, the default: a verified label stays
correct however old its attempt) or are dropped; each is counted. Once the step has run, its fresh examples
are recorded as trained (`trained`): their ids are never taken fresh again, and they join the replay buffer.

Invariants:
- fresh examples are taken in arrival order, each at most once; an id recorded as trained is dropped
  whenever it arrives again (ids are recorded after their step, so the check is against earlier steps);
- replay only accompanies fresh data: a draw without a usable fresh example takes nothing from replay;
- a step never holds more than `step_examples` examples, and replays at most
  `floor(step_examples * replay_fraction)` of them;
- `state`/`load_state` (JSON) carry the queue, the trained ids and the replay buffer with its generator, so a
  restored buffer draws what the original would have.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from persd_online.records import Example
from persd_online.replay import ReplayBuffer
from persd_online.staleness import is_stale

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Draw:
    """One step's examples, and how many fresh ones were dropped on the way."""

    fresh: list[Example]
    replayed: list[Example]
    stale_dropped: int = 0
    stale_replayed: int = 0
    duplicates_dropped: int = 0


class ExampleBuffer:
    """Fresh examples waiting for a step, the ids trained so far, and the replay buffer."""

    def __init__(self, step_examples: int, replay_fraction: float, max_staleness: int, replay: ReplayBuffer,
                 stale_to_replay: bool = True) -> None:
        self.step_examples = step_examples
        self.stale_to_replay = stale_to_replay
        self.replay_fraction = replay_fraction
        self.max_staleness = max_staleness
        self.replay = replay
        self.fresh: list[Example] = []
        self.seen: set[str] = set()

    def add(self, examples: Iterable[Example]) -> None:
        """Queue fresh examples for the next steps."""
        self.fresh.extend(examples)

    def replay_share(self) -> int:
        """Replayed examples the next step takes."""
        return min(math.floor(self.step_examples * self.replay_fraction), len(self.replay))

    def ready(self) -> bool:
        """Whether enough fresh examples wait for a full step."""
        return len(self.fresh) >= self.step_examples - self.replay_share()

    def draw(self, version: int) -> Draw:
        """The next step's examples, staleness judged against the trainer's published `version`."""
        n_replay = self.replay_share()
        fresh: list[Example] = []
        stale = to_replay = duplicates = 0
        while self.fresh and len(fresh) < self.step_examples - n_replay:
            example = self.fresh.pop(0)
            if example.example_id in self.seen:
                duplicates += 1
            elif is_stale(example.adapter_version, version, self.max_staleness):
                if self.stale_to_replay and example.example_id not in self.replay:
                    self.replay.add(example, uses=0)
                    to_replay += 1
                else:
                    stale += 1
                log.debug("stale example %s (attempt v%s, trainer v%d): %s", example.example_id,
                          example.adapter_version, version, "to replay" if self.stale_to_replay else "dropped")
            else:
                fresh.append(example)
        replayed = self.replay.sample(n_replay) if fresh else []
        return Draw(fresh, replayed, stale, to_replay, duplicates)

    def trained(self, fresh: Iterable[Example]) -> None:
        """Record fresh examples as trained: never taken fresh again, offered to replay."""
        for example in fresh:
            self.seen.add(example.example_id)
            self.replay.add(example)

    def adopt(self, trained_ids: set[str]) -> None:
        """Examples with `trained_ids` were trained elsewhere (a version published after the checkpoint this
        buffer was restored from): those still queued go to replay instead, and none is taken fresh again."""
        self.trained(e for e in self.fresh if e.example_id in trained_ids)
        self.fresh = [e for e in self.fresh if e.example_id not in trained_ids]
        self.seen |= trained_ids

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state: trained ids, queued fresh examples, the replay buffer."""
        return {"seen": sorted(self.seen), "fresh": [e.model_dump() for e in self.fresh],
                "replay": self.replay.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state()` returned."""
        self.seen = set(state["seen"])
        self.fresh = [Example(**e) for e in state["fresh"]]
        self.replay.load_state(state["replay"])
