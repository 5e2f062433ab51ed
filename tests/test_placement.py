"""Which placement `auto` picks, and the config each placement gives the actors (pure: no Ray)."""

from __future__ import annotations

import pytest

from persd_online.config import ConfigError, load_config
from persd_online.placement import place, resolve


def test_auto_colocates_on_one_machine_cpu_and_on_a_shared_gpu() -> None:
    cpu = load_config(None)
    assert cpu.placement == "auto"
    assert resolve(cpu, gpus=0, local=True) == "colocated"  # make run on a 2-core machine
    assert resolve(cpu, gpus=0, local=False) == "disaggregated"  # a CPU cluster: actors may land on other nodes
    gpu = load_config(None, ["student.resources.num_gpus=1", "trainer.resources.num_gpus=1"])
    assert resolve(gpu, gpus=1, local=True) == "colocated"  # one GPU for both
    assert resolve(gpu, gpus=2, local=True) == "disaggregated"  # a GPU each
    external = load_config(None, ["student.backend=vllm_server", "student.server_url=http://x:8000"])
    assert resolve(external, gpus=0, local=True) == "disaggregated"
    assert resolve(load_config(None, ["student.num_actors=2"]), gpus=0, local=True) == "disaggregated"


def test_an_explicit_placement_wins_and_an_impossible_colocation_says_what_to_change() -> None:
    assert resolve(load_config(None, ["placement=disaggregated"]), gpus=0, local=True) == "disaggregated"
    assert resolve(load_config(None, ["placement=colocated"]), gpus=0, local=False) == "colocated"
    with pytest.raises(ConfigError, match="student.num_actors=1 or placement: disaggregated"):
        load_config(None, ["placement=colocated", "student.num_actors=2"])  # refused when the config loads
    with pytest.raises(ConfigError, match="needs student.backend: vllm"):
        load_config(None, ["placement=colocated", "student.backend=vllm_server", "student.server_url=http://x:8000"])


def test_colocated_on_cpu_gives_both_sides_every_core() -> None:
    config = load_config(None)  # student on core 0, trainer on core 1
    placed = place(config, "colocated")
    assert placed.student.cpu_cores == placed.trainer.cpu_cores == [0, 1]
    assert placed.trainer.torch_threads is None  # one per core of the union
    assert not placed.student.sleep_mode
    assert place(config, "disaggregated") == config  # unchanged


def test_resources_env_becomes_the_actors_runtime_env() -> None:
    config = load_config(None, ["trainer.resources.env={OMP_WAIT_POLICY: PASSIVE}"])
    assert config.trainer.resources.ray_options()["runtime_env"] == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    assert "runtime_env" not in config.student.resources.ray_options()  # none given: Ray's own
    unpinned = place(load_config(None, ["trainer.cpu_cores=null"]), "colocated")
    assert unpinned.student.cpu_cores is None and unpinned.trainer.cpu_cores is None  # every core


def test_colocated_on_a_gpu_turns_the_engine_sleep_mode_on() -> None:
    config = load_config(None, ["student.resources.num_gpus=0.5", "trainer.resources.num_gpus=0.5",
                                "student.cpu_cores=null", "trainer.cpu_cores=null"])
    placed = place(config, "colocated")
    assert placed.student.sleep_mode and placed.student.cpu_cores is None
