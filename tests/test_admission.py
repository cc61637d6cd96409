"""Admission policies: always, and second_hit with a bounded memory of seen keys."""

from __future__ import annotations

import pytest

from hicache.config import TierConfig
from hicache.tiering.admission import Admission, AlwaysAdmit, SecondHitAdmit, make_admission


def k(i: int) -> str:
    return f"{i:064x}"


def test_always_admits_everything() -> None:
    policy = make_admission(Admission.ALWAYS)
    assert isinstance(policy, AlwaysAdmit)
    assert policy.admit([k(1), k(2)]) == [True, True]
    assert policy.admit_prefix([k(1), k(2), k(3)]) == 3


def test_second_hit_admits_on_second_sighting() -> None:
    policy = make_admission("second_hit")
    assert isinstance(policy, SecondHitAdmit)
    assert policy.admit([k(1), k(2)]) == [False, False]
    assert policy.admit([k(1), k(2), k(3)]) == [True, True, False]
    assert policy.admit([k(3)]) == [True]
    s = policy.stats()
    assert s["kind"] == "second_hit" and s["admitted"] == 3 and s["refused"] == 3


def test_second_hit_prefix_stops_at_first_refusal() -> None:
    policy = SecondHitAdmit()
    policy.admit([k(1), k(3)])
    # k(2) is new: the chain [1, 2, 3] is admitted only up to 1, so the tier stays prefix-closed
    assert policy.admit_prefix([k(1), k(2), k(3)]) == 1
    # ... and k(2) was recorded as seen, so the next offer goes further
    assert policy.admit_prefix([k(1), k(2), k(3)]) == 3


def test_second_hit_memory_is_bounded_lru() -> None:
    policy = SecondHitAdmit(capacity=3)
    policy.admit([k(1), k(2), k(3)])
    policy.admit([k(1)])  # touch 1: now 2 is the least recent
    policy.admit([k(4)])  # forgets 2
    assert len(policy) == 3
    assert policy.stats()["forgotten"] == 1
    assert policy.admit([k(2)]) == [False]  # forgotten: a first sighting again
    assert policy.admit([k(1)]) == [True]
    assert len(policy) == 3


def test_matches_config_enum() -> None:
    for kind in Admission:
        assert make_admission(kind).kind is kind
    tier = TierConfig(backend="memory", admission="second_hit")
    assert make_admission(tier.admission).kind is Admission.SECOND_HIT
    with pytest.raises(ValueError):
        make_admission("third_hit")
    with pytest.raises(ValueError, match="capacity"):
        SecondHitAdmit(0)
