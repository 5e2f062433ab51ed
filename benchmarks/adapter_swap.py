"""Adapter swap latency: from the trainer publishing a version to the first token the student serves with it.

Each swap times, in order: the atomic publish of a rank-16 peft adapter over every projection (the trainer's
default; `save_pretrained` into a staging dir, marker, fsync, rename), the student actor's `load_adapter`
(marker check, engine add, the delivery probe), and a one-token generation on the new version through the
actor. `swap_latency_s` is the median over the swaps of that whole span.

Writes `benchmarks/results/adapter_swap.json`. Run: `python benchmarks/adapter_swap.py` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the trainer stand-in lives with the tests
from persd_online.atomic import write_text  # noqa: E402
from persd_online.config import StudentConfig  # noqa: E402
from persd_online.engine import Sampling  # noqa: E402
from persd_online.models import prepare_model  # noqa: E402
from persd_online.prompts import attempt_prompt  # noqa: E402
from persd_online.student import start_student, stop_student  # noqa: E402
from persd_online.tasks import load_mbpp  # noqa: E402
from tests.lora_fixtures import AdapterFactory  # noqa: E402

log = logging.getLogger("benchmarks.adapter_swap")
RESULT = Path(__file__).parent / "results" / "adapter_swap.json"
FIRST_TOKEN = Sampling(temperature=0.0, max_tokens=1)


def measure(actor: ray.actor.ActorHandle, factory: AdapterFactory, version: int) -> dict[str, float]:
    """One swap to `version`; the adapter's weights are set before the clock starts."""
    factory.set_weights(seed=version, scale=0.5)
    prompt = attempt_prompt(load_mbpp("train")[0], "chat")
    start = time.perf_counter()
    path = factory.save(version)
    published = time.perf_counter()
    report = ray.get(actor.load_adapter.remote(version, path))
    loaded = time.perf_counter()
    [[first]] = ray.get(actor.generate_prompts.remote([prompt], FIRST_TOKEN, 1, version))
    served = time.perf_counter()
    if first.version != version or first.completion_tokens != 1:
        raise RuntimeError(f"swap to version {version} served {first}")
    return {"swap_latency_s": served - start, "publish_s": published - start,
            "load_adapter_call_s": loaded - published, "engine_add_s": report.load_s, "probe_s": report.probe_s,
            "first_token_s": served - loaded, "probe_logprob_delta": report.logprob_delta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    model = prepare_model()
    config = StudentConfig(cpu_kvcache_gib=1, max_model_len=1024)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster: no token auth
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="persd-bench-") as work:
        factory = AdapterFactory(model, Path(work) / "adapters", r=16)
        actor = start_student(config, model, Path(work) / "student")
        try:
            swaps = [measure(actor, factory, version) for version in range(1, args.swaps + 1)]
        finally:
            stop_student(actor)
            ray.shutdown()
        adapter_bytes = sum(f.stat().st_size for f in factory.path(1).iterdir())
    medians = {key: statistics.median(s[key] for s in swaps) for key in swaps[0]}
    result = {
        "swap_latency_s": medians["swap_latency_s"],
        "median": medians,
        "swaps": swaps,
        "adapter": {"rank": 16, "targets": "q,k,v,o,gate,up,down proj", "bytes": adapter_bytes},
        "student": {"model": model.name, "max_loras": config.max_loras, "backend": config.backend,
                    "in_process": True},
        "machine": {"device": "cpu", "gpu": None, "note": "no GPU in this session", "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
    }
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    log.info("median swap latency %.3f s over %d swaps -> %s", result["swap_latency_s"], len(swaps), args.out)


if __name__ == "__main__":  # the engine starts worker processes that re-import this module
    main()
