"""Where the student and the trainer run: side by side on devices of their own, or taking turns on shared ones.

`placement` (config) is `disaggregated`, `colocated` or `auto`:

- disaggregated: the student and the trainer each hold their own devices all the time (on CPU, their own
  cores: `student.cpu_cores`, `trainer.cpu_cores`; on GPUs, a GPU each) and run at once
  (`scheduler.ConcurrentScheduler`). It wins where each side has devices enough of its own: the student
  never waits for the trainer, nor the trainer for the student.
- colocated: the student and the trainer share the same cores or GPU and take turns
  (`scheduler.ColocatedScheduler`): a generation phase gives vLLM every core (or the whole GPU), a training
  phase gives torch every core (the GPU engine sleeps meanwhile). It wins where the devices would otherwise be
  split: on a 2-core machine each stage gets both cores in its turn instead of one core always.
- auto (the default) picks colocated when the two would share devices: one student engine and one trainer on
  one machine's CPU cores (a local Ray), or on GPUs that do not give each its own
  (`student.resources.num_gpus + trainer.resources.num_gpus` at most one GPU, e.g. 0.5 + 0.5, which Ray
  packs onto one GPU, or more than the GPUs there are); otherwise disaggregated.
  A student behind an external server (`student.backend: vllm_server`) or several student engines are never
  colocated: the loop cannot hand an external server's device to the trainer, nor share one trainer's turns
  among engines.

`place(config, placement)` returns the config the actors get. Colocated, on CPU: both sections' core lists
become their union (null if either is null: every core); on a GPU: vLLM's sleep mode is on
(`student.sleep_mode`). The side whose turn it is not is idle on CPU without further settings: measured
(`benchmarks/idle_cores.py`), the waiting engine used 0.03 of a core and the waiting trainer under 0.01 under the
OpenMP runtime's default wait policy (its threads spin only briefly at a barrier, then sleep);
`OMP_WAIT_POLICY=PASSIVE` idled no better and its training steps were slower (5.78 against 4.69 s, two runs agree),
and `ACTIVE`, the control, spun a whole core. So no wait policy is set (`*.resources.env` can set one).

Invariants: `resolve` never returns `auto`; `place` does not change a disaggregated config; an explicit
`colocated` that cannot run is refused when the config loads (`config.Config`), naming the key to change.
"""

from __future__ import annotations

from typing import Literal

from persd_online.config import Config

Placement = Literal["disaggregated", "colocated"]


def resolve(config: Config, gpus: float, local: bool) -> Placement:
    """The placement `config.placement` stands for on a cluster with `gpus` GPUs (`local`: a Ray started here,
    one machine) -- see the module docstring."""
    s, t = config.student, config.trainer
    if config.placement != "auto":
        return config.placement
    if s.backend != "vllm" or s.num_actors > 1:
        return "disaggregated"
    on_gpu = s.resources.num_gpus > 0 or t.resources.num_gpus > 0
    if on_gpu:
        both = s.resources.num_gpus + t.resources.num_gpus
        return "colocated" if both <= 1 or both > gpus else "disaggregated"
    return "colocated" if local else "disaggregated"


def place(config: Config, placement: Placement) -> Config:
    """The config the actors get under `placement` (see the module docstring)."""
    if placement == "disaggregated":
        return config
    s, t = config.student, config.trainer
    if s.resources.num_gpus > 0:
        return config.model_copy(update={"student": s.model_copy(update={"sleep_mode": True})})
    cores = None if s.cpu_cores is None or t.cpu_cores is None else sorted(set(s.cpu_cores) | set(t.cpu_cores))
    return config.model_copy(update={"student": s.model_copy(update={"cpu_cores": cores}),
                                     "trainer": t.model_copy(update={"cpu_cores": cores, "torch_threads": None})})
