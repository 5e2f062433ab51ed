"""`ServerEngine`: the student's generation engine as an external `vllm serve --enable-lora` deployment.

For clusters that run the student as its own service. Generation goes through the OpenAI completions API
(token-id prompts, so the text the model sees is exactly the student's rendering); adapter swaps through
vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, which the server only exposes when started
with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`.

Invariants:
- adapter directories are read by the server: they must be visible there at the same path;
- an adapter's served name is `v<version>-<hash of its path>`: unique per run directory, so students of one
  run sharing a server share its adapters, and runs sharing a server never collide;
- the server's own `--max-loras`/`--max-cpu-loras` bound what it holds; unloading only unregisters a name.
"""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import openai

from persd_online.engine import Generation, Sampling

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600.0  # one batched completions request: a whole generate call
MAX_RETRIES = 2  # the openai client's retries on connection errors and 5xx answers


def wait_until_healthy(base_url: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Block until `<base_url>/health` answers 200; TimeoutError after `timeout_s`."""
    url = f"{_root(base_url)}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=min(5.0, timeout_s)) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no healthy vLLM server at {url} after {timeout_s:.0f} s; is it running "
                               "(and reachable from this machine)?")
        time.sleep(poll_s)


def _root(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


class ServerEngine:
    """A `GenerationEngine` backed by a running `vllm serve --enable-lora` server."""

    def __init__(self, base_url: str, connect_timeout_s: float = 60.0) -> None:
        wait_until_healthy(base_url, connect_timeout_s)
        self._client = openai.OpenAI(base_url=f"{_root(base_url)}/v1", api_key="EMPTY",
                                     timeout=REQUEST_TIMEOUT_S, max_retries=MAX_RETRIES)
        roots = [m.id for m in self._client.models.list().data if getattr(m, "parent", None) is None]
        if not roots:
            raise RuntimeError(f"the server at {base_url} lists no base model")
        self._base = roots[0]
        self._names: dict[int, str] = {}

    def _name(self, version: int) -> str:
        try:
            return self._names[version]
        except KeyError:
            raise KeyError(f"adapter version {version} is not loaded through this engine") from None

    def generate(self, prompts: Sequence[Sequence[int]], versions: Sequence[int], n: int,
                 sampling: Sampling) -> list[list[Generation]]:
        results: list[list[Generation]] = [[] for _ in prompts]
        for version in dict.fromkeys(versions):  # one request per version (the API takes one model each)
            indices = [i for i, v in enumerate(versions) if v == version]
            caps = sampling.caps(len(prompts))
            response = self._client.completions.create(
                model=self._name(version), prompt=[list(prompts[i]) for i in indices], n=n,
                temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=max(caps[i] for i in indices),
                stop=list(sampling.stop) or None, seed=sampling.seed, extra_body={"return_token_ids": True},
            )
            # vLLM orders the choices of a batched request prompt-major: choice k is prompt k // n.
            for choice in sorted(response.choices, key=lambda c: c.index):
                i = indices[choice.index // n]
                results[i].append(Generation(
                    text=choice.text, version=version, prompt_tokens=len(prompts[i]),
                    completion_tokens=len(choice.token_ids), finish_reason=choice.finish_reason))
        return results

    def add_adapter(self, version: int, path: Path) -> None:
        name = f"v{version}-{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:10]}"
        body = {"lora_name": name, "lora_path": str(path)}
        try:
            self._client.post("/load_lora_adapter", body=body, cast_to=str)
        except openai.BadRequestError as exc:
            if "already been loaded" not in str(exc):  # else another student of this run loaded this path
                raise RuntimeError(
                    f"the server refused adapter version {version} from {path}: {exc}; was it started with "
                    "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1?") from None
        self._names[version] = name

    def remove_adapter(self, version: int) -> None:
        name = self._names.pop(version, None)
        if name is not None:
            try:
                self._client.post("/unload_lora_adapter", body={"lora_name": name}, cast_to=str)
            except openai.NotFoundError:
                log.info("adapter %s was already unloaded from the server", name)

    def adapters(self) -> set[int]:
        served = {m.id for m in self._client.models.list().data}
        return {version for version, name in self._names.items() if name in served}

    def metrics(self) -> dict[str, float]:
        """None read here: the server publishes its own Prometheus metrics at `/metrics` for the cluster's
        scraper."""
        return {}

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], version: int | None) -> list[list[float]]:
        model = self._base if version is None else self._name(version)
        response = self._client.completions.create(model=model, prompt=[list(ids) for ids in prompts], max_tokens=1,
                                                   temperature=0.0, extra_body={"prompt_logprobs": 0})
        choices = sorted(response.choices, key=lambda c: c.index)
        return [[float(r[str(token)]["logprob"]) for token, r in zip(ids[1:], c.prompt_logprobs[1:], strict=True)]
                for ids, c in zip(prompts, choices, strict=True)]

    def sleep(self) -> None:
        raise NotImplementedError("an external vLLM server is not put to sleep by the loop (placement.py: a "
                                  "vllm_server student is never colocated)")

    def wake_up(self) -> None:
        self.sleep()

    def shutdown(self) -> None:
        self._client.close()
