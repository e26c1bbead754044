"""Admission control's capacity estimate (services/gateway/admission.py): from measured model cost,
per transcriber, so it scales with replicas; refusals carry CAPACITY_EXHAUSTED and a retry delay."""

from __future__ import annotations

import pytest

from services.gateway.admission import StreamAdmission
from services.shared.domain import WindowResult
from services.shared.errors import QuotaExceeded


def _result(replica: str, batch: int, seconds: float) -> WindowResult:
    return WindowResult([], "en", served_by=replica, batch_size=batch, model_seconds=seconds)


def test_capacity_follows_measured_cost_and_replicas():
    replicas = ["a:1"]
    adm = StreamAdmission(lambda: replicas, target_tick=0.6, initial=4)
    assert adm.capacity() == 4  # not measured yet
    for _ in range(5):
        adm.observe(_result("a:1", 8, 0.6))  # 0.075 s per window
    assert adm.capacity() == 8
    adm.observe(_result("a:1", 1, 5.0))  # a batch of one says nothing about the marginal cost
    assert adm.capacity() == 8
    replicas.append("b:2")  # a second replica, not measured yet: its initial share
    assert adm.capacity() == 12
    for _ in range(5):
        adm.observe(_result("b:2", 4, 0.1))  # a faster replica (a GPU): 0.025 s per window
    assert adm.capacity() == 8 + 24
    replicas.clear()
    assert adm.capacity() == 0


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
