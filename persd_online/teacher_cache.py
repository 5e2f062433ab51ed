"""The teacher's on-disk, content-addressed cache of chat requests and their responses.

A request is addressed by the sha256 of its canonical JSON (sorted keys, no whitespace) over exactly
what determines the answer: model, messages, temperature, max_tokens. The endpoint URL and the API key are
not part of the address, so a local mirror and a hosted endpoint of the same model share entries, and an
offline baseline and an online run can share one cache directory.

Layout: `<root>/<first two hex digits>/<sha256>.json`, each file `{"key", "request", "response"}`,
written atomically (a reader sees a whole entry or none). Invariants: an entry is never partially
visible; an unreadable entry, or one whose stored request differs from the one asked for, is a miss
(logged) and is overwritten by the next `put`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from persd_online.atomic import write_text

log = logging.getLogger(__name__)

Json = dict[str, Any]


def content_address(payload: Json) -> str:
    """The sha256 hex digest of `payload`'s canonical JSON; equal payloads always get equal addresses."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class TeacherCache:
    """Responses by request address below one directory (the caller owns where it lives)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Where the entry for `key` lives."""
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, request: Json) -> Json | None:
        """The stored response for `request` (addressed by `key`), or None on a miss."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable teacher cache entry %s: %s", path, exc)
            return None
        if not isinstance(entry, dict) or entry.get("request") != request or "response" not in entry:
            log.warning("ignoring teacher cache entry %s: it does not hold this request", path)
            return None
        return entry["response"]

    def put(self, key: str, request: Json, response: Json) -> None:
        """Store `response` for `request` atomically."""
        entry = {"key": key, "request": request, "response": response}
        write_text(self.path(key), json.dumps(entry, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
