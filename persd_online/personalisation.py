"""How close a label is to the student's own attempt: the line-diff edit distance (PERsD's "personalised").

DISTANCE MEASURE (`edit_distance(label, attempt)`). Both programs are split into lines (`str.splitlines`),
and lines are compared with their trailing whitespace removed (indentation and blank lines count).
`difflib.SequenceMatcher(None, attempt_lines, label_lines, autojunk=False)` aligns them; every opcode that is
not `equal` is a hunk, and a hunk changes max(attempt lines it removes, label lines it inserts) lines: a
replaced line counts once, an inserted or a deleted line once. Then

    changed_lines = the sum of that over the hunks (0: the same program, up to trailing whitespace);
    ratio = changed_lines / max(number of attempt lines, 1).

The ratio is the share of the attempt the label rewrites; it can exceed 1 when the label adds more lines than
the attempt has. The direction is fixed (attempt -> label): difflib's alignment is a good diff, not a
guaranteed minimal one, and is not exactly symmetric. The measure is textual: a label that renames a
variable everywhere, or re-indents, changes every line it touches.

`line_hunks` and `apply_hunks` are the same diff as edits: `persd_online.reference_repair` builds its
candidate labels by applying subsets of `line_hunks(attempt, reference)`, so its search and this measure are
one implementation.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Hunk:
    """One non-equal block of the line diff: attempt lines [a_start, a_end) become the label's `lines`."""

    a_start: int
    a_end: int
    lines: tuple[str, ...]

    @property
    def changed_lines(self) -> int:
        """Lines this hunk changes: max(attempt lines removed, label lines inserted)."""
        return max(self.a_end - self.a_start, len(self.lines))


@dataclass(frozen=True)
class EditDistance:
    """How far a label is from the attempt it was made from (see the module docstring)."""

    changed_lines: int
    ratio: float
    hunks: int
    attempt_lines: int
    label_lines: int


def line_hunks(attempt: str, label: str) -> list[Hunk]:
    """The hunks that turn `attempt` into `label`, in attempt order; lines compare without trailing whitespace."""
    a_lines, b_lines = attempt.splitlines(), label.splitlines()
    matcher = difflib.SequenceMatcher(None, [line.rstrip() for line in a_lines],
                                      [line.rstrip() for line in b_lines], autojunk=False)
    return [Hunk(i1, i2, tuple(b_lines[j1:j2])) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]


def apply_hunks(attempt_lines: Sequence[str], hunks: Sequence[Hunk]) -> list[str]:
    """`attempt_lines` with `hunks` (of `line_hunks` over these lines, any subset) applied."""
    out: list[str] = []
    position = 0
    for hunk in sorted(hunks, key=lambda h: h.a_start):
        if hunk.a_start < position:
            raise ValueError("overlapping hunks")
        out.extend(attempt_lines[position:hunk.a_start])
        out.extend(hunk.lines)
        position = hunk.a_end
    out.extend(attempt_lines[position:])
    return out


def edit_distance(label: str, attempt: str) -> EditDistance:
    """Changed lines and their ratio to the attempt's length, from `attempt` to `label` (module docstring)."""
    hunks = line_hunks(attempt, label)
    changed = sum(h.changed_lines for h in hunks)
    attempt_lines = len(attempt.splitlines())
    return EditDistance(changed_lines=changed, ratio=changed / max(attempt_lines, 1), hunks=len(hunks),
                        attempt_lines=attempt_lines, label_lines=len(label.splitlines()))


@dataclass(frozen=True)
class LabelDistance:
    """One verified label: the tier that made it, and how far it and the task's reference are from the attempt."""

    attempt_id: str
    tier: str
    label_ratio: float
    reference_ratio: float | None  # None: the task has no reference
    # mean per token, under the version the student served when the label arrived (None: not measured)
    label_logprob: float | None = None
    reference_logprob: float | None = None


def label_distance(attempt_id: str, tier: str, label: str, attempt: str, reference: str | None) -> LabelDistance:
    """The edit ratios (module docstring) of a label and of the task's reference, both from `attempt`."""
    return LabelDistance(attempt_id, tier, round(edit_distance(label, attempt).ratio, 4),
                         None if reference is None else round(edit_distance(reference, attempt).ratio, 4))


def summarise(labels: Sequence[LabelDistance]) -> dict[str, object]:
    """Labels per tier, the median edit ratio of the labels and of the references, the share of labels closer to
    the attempt than the reference is, and where log-probs were measured, the median gap (label minus reference,
    nats per token) and the share of labels the student found more likely (the run's personalisation)."""
    import numpy as np

    paired = [d for d in labels if d.reference_ratio is not None]
    measured = [d for d in paired if d.label_logprob is not None and d.reference_logprob is not None]
    by_tier: dict[str, int] = {}
    for d in labels:
        by_tier[d.tier] = by_tier.get(d.tier, 0) + 1
    return {
        "labels": len(labels), "by_tier": by_tier,
        "median_edit_ratio": float(np.median([d.label_ratio for d in labels])) if labels else None,
        "median_reference_edit_ratio": float(np.median([d.reference_ratio for d in paired])) if paired else None,
        "closer_than_reference": (round(sum(d.label_ratio < d.reference_ratio for d in paired) / len(paired), 4)
                                  if paired else None),
        "logprobs_measured": len(measured),
        "median_logprob_gap": (round(float(np.median([d.label_logprob - d.reference_logprob for d in measured])), 4)
                               if measured else None),
        "more_likely_than_reference": (round(sum(d.label_logprob > d.reference_logprob for d in measured)
                                             / len(measured), 4) if measured else None),
    }
