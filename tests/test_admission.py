"""Admission control's capacity estimate (services/gateway/admission.py): from measured model cost,
per transcriber, so it scales with replicas; refusals carry CAPACITY_EXHAUSTED and a retry delay."""

from __future__ import annotations

import pytest

from services.gateway.admission import StreamAdmission
from services.shared.domain import WindowResult
from services.shared.errors import QuotaExceeded


def _result(replica: str, batch: int, seconds: float, workers: int = 1) -> WindowResult:
    return WindowResult(
        [], "en", served_by=replica, batch_size=batch, model_seconds=seconds, model_workers=workers
    )


def _calls(adm: StreamAdmission, replica: str, fixed: float, per_window: float, workers: int = 1) -> None:
    for b in (1, 2, 4, 8, 1, 3, 6, 8, 2, 5):
        adm.observe(_result(replica, b, fixed + per_window * b, workers))


def test_capacity_follows_measured_cost_and_replicas():
    replicas = ["a:1"]
    adm = StreamAdmission(lambda: replicas, target_tick=0.7, initial=4)
    assert adm.capacity() == 4  # not measured yet
    _calls(adm, "a:1", 0.3, 0.05)  # (0.7 - 0.3) / 0.05 = 8 streams in a tick
    assert adm.capacity() == 8
    replicas.append("b:2")  # a second replica, not measured yet: its initial share
    assert adm.capacity() == 12
    _calls(adm, "b:2", 0.1, 0.01)  # a faster replica (a GPU)
    assert adm.capacity() == 8 + 60
    replicas.clear()
    assert adm.capacity() == 0


def test_a_transcriber_with_two_workers_serves_two_calls_per_tick():
    """Live windows are shared out among a transcriber's workers, whose calls run side by side: the
    streams that fit in one measured call, times the workers."""
    adm = StreamAdmission(lambda: ["a:1"], target_tick=0.7, initial=4)
    _calls(adm, "a:1", 0.3, 0.05, workers=2)
    assert adm.capacity() == 16


def test_calls_of_one_size_use_the_amortised_cost():
    adm = StreamAdmission(lambda: ["a:1"], target_tick=0.6, initial=4)
    for _ in range(10):
        adm.observe(_result("a:1", 8, 0.6 + _ * 1e-4))
    assert adm.capacity() == 7  # 0.6 / (0.6x / 8): conservative


def test_past_capacity_refused_with_retry_and_released():
    adm = StreamAdmission(lambda: ["a:1"], fixed=2, retry_after=3.0)
    t1, t2 = adm.admit(), adm.admit()
    with pytest.raises(QuotaExceeded) as err:
        adm.admit()
    assert err.value.reason == "CAPACITY_EXHAUSTED" and err.value.retry_after_seconds == 3.0
    t1.release()
    t1.release()  # idempotent
    with adm.admit():
        assert adm.active == 2
    t2.release()
    assert adm.active == 0


def test_share_splits_capacity_between_gateways():
    adm = StreamAdmission(lambda: ["a:1", "b:2"], fixed=8, share=0.5)
    assert adm.capacity() == 8
