"""LoopMetrics: counters, tagged gauges and busy fractions, exported to a real local Ray."""

import time

import pytest
import ray

from persd_online.metrics import LoopMetrics


def test_counters_gauges_and_busy_fractions():
    metrics = LoopMetrics(export_to_ray=False, counters={"attempts": 5})
    metrics.inc("attempts")
    metrics.set("queue_depth", 3, queue="refine")
    with metrics.busy("sandbox"):
        time.sleep(0.05)
    snap = metrics.snapshot()
    assert snap["attempts"] == 6 and snap["queue_depth/refine"] == 3
    assert 0.5 < snap["busy/sandbox"] <= 1.0
    with pytest.raises(KeyError, match="unknown counter"):
        metrics.inc("atempts")


def test_exports_to_ray_metrics():
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        metrics = LoopMetrics(export_to_ray=True)
        metrics.inc("teacher_calls", 2)
        metrics.set("heldout_pass1", 0.25, task_set="humaneval")
        assert metrics.counters["teacher_calls"] == 2
        assert metrics.gauges["heldout_pass1/humaneval"] == 0.25
    finally:
        ray.shutdown()


def test_the_dashboard_line_names_the_dashboard_url_not_the_gcs_address():
    from types import SimpleNamespace

    from persd_online.driver import dashboard_url

    assert dashboard_url(SimpleNamespace(dashboard_url="127.0.0.1:8265")) == "http://127.0.0.1:8265"
    assert dashboard_url(SimpleNamespace(dashboard_url="http://10.0.0.1:8265")) == "http://10.0.0.1:8265"
    assert "not running" in dashboard_url(SimpleNamespace(dashboard_url=""))
