"""The trainer's checkpoints: everything a restarted trainer needs to go on as if it had not stopped.

    <checkpoints_dir>/
      trainer.json          {"latest": "trainer-00007"}: the checkpoint to restore, replaced atomically
      trainer-00007/
        adapter/            the learner's LoRA weights (peft format)
        optim.pt            the learner's optimizer, scheduler and RNG state (`Learner.state`)
        state.json          the trainer's own state: version, checkpoint number, counters, example buffer, ...
        (marker)            written last (`atomic.publish_dir`, `adapters.MARKER`)

Invariants:
- a checkpoint directory is published whole (staging directory, fsync, rename) and never changed after;
- `trainer.json` is written after the checkpoint it names, atomically, so it always names a complete one; older
  checkpoints are removed only after that, so a crash at any point leaves a restorable checkpoint (or none
  before the first);
- checkpoint numbers only go forward, also across restores (the number is part of the state).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from persd_online import adapters, atomic

if TYPE_CHECKING:
    from persd_online.learner import Learner

POINTER = "trainer.json"


class TrainerCheckpoints:
    """The checkpoints of one trainer, under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seq = 0

    def save(self, learner: Learner, version: int, state: dict[str, Any]) -> Path:
        """Checkpoint `learner` and the trainer's JSON `state` at published `version`; removes older checkpoints
        once the new one is named. Returns the checkpoint's directory."""
        self.seq += 1
        name = f"trainer-{self.seq:05d}"
        full = {"version": version, "checkpoint_seq": self.seq, **state}

        def build(staging: Path) -> None:
            learner.save_adapter(staging / "adapter")
            torch.save(learner.state(), staging / "optim.pt")
            (staging / "state.json").write_text(json.dumps(full))

        # The adapter directories' completion marker (nothing reads it here: `trainer.json` names a checkpoint).
        target = atomic.publish_dir(self.directory / name, build, marker=adapters.MARKER)
        atomic.write_text(self.directory / POINTER, json.dumps({"latest": name}))
        for old in self.directory.glob("trainer-[0-9]*"):
            if old.name != name and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        return target

    def restore(self, learner: Learner) -> dict[str, Any] | None:
        """Load the latest checkpoint into `learner` and return the trainer's state as saved (with "version" and
        "checkpoint_seq"); None if there is no checkpoint."""
        pointer = self.directory / POINTER
        if not pointer.is_file():
            return None
        directory = self.directory / json.loads(pointer.read_text())["latest"]
        state = json.loads((directory / "state.json").read_text())
        learner.load_adapter(directory / "adapter")
        learner.load_state(torch.load(directory / "optim.pt", map_location=learner.device, weights_only=False))
        self.seq = state["checkpoint_seq"]
        return state
