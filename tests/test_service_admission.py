"""Admission control (service/admission.py): room in all and per client, held and given back."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from service.admission import AdmissionControl, QueueFullError
from service.metrics import ServiceMetrics


def control(capacity: int = 8, per_client: int = 5) -> AdmissionControl:
    return AdmissionControl(
        ServiceMetrics(CollectorRegistry()), capacity=capacity, per_client=per_client
    )


def gauge(admission: AdmissionControl, name: str) -> float | None:
    return admission._metrics.registry.get_sample_value(name)


def test_calls_are_admitted_whole_or_refused_when_the_queue_is_full() -> None:
    admission = control()
    first, second = admission.admit("a", 4), admission.admit("b", 2)
    with pytest.raises(QueueFullError, match="queue is full: 6 of 8 images waiting, no room for 3"):
        admission.admit("c", 3)
    assert admission.held == 6 and gauge(admission, "anomaly_queue_depth_images") == 6
    with admission.admit("c", 2):  # exactly fits
        assert admission.held == 8
    first.release()
    second.release()
    assert admission.held == 0 and gauge(admission, "anomaly_queue_capacity_images") == 8


def test_one_client_cannot_hold_more_than_its_share() -> None:
    admission = control()
    greedy = admission.admit("greedy", 5)
    with pytest.raises(QueueFullError, match="this client already has 5 images waiting, of the 5"):
        admission.admit("greedy", 1)
    polite = admission.admit("polite", 3)  # the others keep the rest of the queue
    assert admission.held_by("greedy") == 5 and admission.held_by("polite") == 3
    greedy.release(2)  # part of the room given back: the client may use it again
    admission.admit("greedy", 2)
    assert admission.held_by("greedy") == 5 and admission.held == 8
    polite.release()
    assert admission.held_by("polite") == 0


def test_room_is_given_back_on_exit_and_only_once() -> None:
    admission = control()
    with pytest.raises(RuntimeError), admission.admit("a", 3) as ticket:
        raise RuntimeError("the call failed")
    assert admission.held == 0
    ticket.release()
    assert admission.held == 0 and ticket.count == 0


def test_a_share_larger_than_the_queue_is_refused() -> None:
    with pytest.raises(ValueError, match="per_client <= capacity"):
        control(capacity=4, per_client=5)
