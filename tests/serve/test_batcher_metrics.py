"""A batcher's metric calls wait for `flush`, which its engine's step thread makes between steps."""

from __future__ import annotations

import logging

from deployments.metrics import BatcherMetrics
from neuron_serve.config import Limits
from neuron_serve.engine import StepStats


def test_recording_queues_the_ray_calls_and_flush_makes_them(monkeypatch, caplog):
    metrics = BatcherMetrics(Limits(4, 128, 256, 512), "0,1")
    made = []
    monkeypatch.setattr(metrics.inference_count, "inc", lambda **kw: made.append(("inference_count", kw["tags"])))
    monkeypatch.setattr(metrics.current_size, "set", lambda value, **kw: made.append(("current_size", value)))
    monkeypatch.setattr(metrics.inter_token_latency, "observe", lambda value, **kw: made.append(("itl", value)))

    metrics.record(StepStats("decode", rows=4, inserted=0, rebuilt=0, forward_s=0.01, total_s=0.012, active=3,
                             waiting=0, failed=False))
    metrics.delivered(0.02, tokens=2, first=False)
    metrics.gauges(active=1, waiting=0)
    assert made == []  # nothing called into Ray yet: each call lets go of the GIL

    monkeypatch.setattr(metrics.queue_size, "set", lambda value, **kw: 1 / 0)  # one failing call
    with caplog.at_level(logging.ERROR):
        metrics.flush()
    assert made == [("inference_count", {"method": "decode"}), ("current_size", 3), ("itl", 0.01), ("itl", 0.01),
                    ("current_size", 1)]
    assert "recording a metric failed" in caplog.text  # logged; the queued calls after it were still made
    metrics.flush()
    assert len(made) == 5
