"""The replay buffer: earlier training examples mixed into each step so the student does not forget.

Rules: an example enters after its first optimizer step (fresh examples are never waiting here), or
unused when it arrived too stale to train fresh (`trainer.stale_labels: replay`); the
buffer holds at most `capacity` examples, evicting the oldest; an example is drawn at most `max_reuse - 1`
more times (its first training counts as one use) and leaves the buffer when used up; draws are uniform
among eligible examples, from a seeded generator whose state is checkpointed with the buffer.

Replay is the one deliberate exception to bounded staleness (`staleness.py`): staleness bounds which fresh
examples may still be trained; replayed ones were trained once while fresh and are reused on purpose.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from persd_online.records import Example


class ReplayBuffer:
    """Bounded, de-duplicated store of trained examples with per-example reuse counts."""

    def __init__(self, capacity: int, max_reuse: int, seed: int = 0) -> None:
        if capacity < 1 or max_reuse < 1:
            raise ValueError("replay capacity and max_reuse must be at least 1")
        self.capacity = capacity
        self.max_reuse = max_reuse
        self._items: OrderedDict[str, tuple[Example, int]] = OrderedDict()  # id -> (example, uses)
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._items

    def add(self, example: Example, uses: int = 1) -> None:
        """Hold an example `uses` times trained already: 1 for a freshly trained one, 0 for a verified label that
        arrived too stale to train fresh (ignored if held already or already used up)."""
        if example.example_id in self._items or uses >= self.max_reuse:
            return
        self._items[example.example_id] = (example, uses)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def sample(self, k: int) -> list[Example]:
        """Up to `k` distinct examples, each use counted; used-up examples leave the buffer."""
        chosen = self._rng.sample(list(self._items), min(k, len(self._items)))
        drawn = []
        for example_id in chosen:
            example, uses = self._items[example_id]
            drawn.append(example)
            if uses + 1 >= self.max_reuse:
                del self._items[example_id]
            else:
                self._items[example_id] = (example, uses + 1)
        return drawn

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state (examples, uses, generator state)."""
        version, internal, gauss = self._rng.getstate()
        return {"items": [[e.model_dump(), uses] for e, uses in self._items.values()],
                "rng": [version, list(internal), gauss]}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state()` returned."""
        self._items = OrderedDict((e["example_id"], (Example(**e), uses)) for e, uses in state["items"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
