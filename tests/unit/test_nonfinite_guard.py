"""The non-finite guard's bookkeeping (pure) and the test-only NaN fault hook."""

import pytest

from clustertune import watchdog
from clustertune.worker.nonfinite import NonFiniteGuard, TrainingDiverged, is_nonfinite

NAN, INF = float("nan"), float("inf")


def test_is_nonfinite_looks_at_the_loss_and_a_reported_norm():
    assert not is_nonfinite(2.0, 1.0)
    assert not is_nonfinite(2.0, None)  # a path that reports no norm: the loss decides
    assert is_nonfinite(NAN, 1.0) and is_nonfinite(INF, None) and is_nonfinite(2.0, INF)


def test_skipped_steps_are_counted_and_a_good_step_resets_the_run_of_them():
    guard = NonFiniteGuard(max_in_row=3)
    assert guard.check(step=1, loss=2.0, grad_norm=1.0, applied=True) is False
    assert guard.check(step=2, loss=NAN, grad_norm=INF, applied=False) is True
    assert guard.check(step=3, loss=2.0, grad_norm=INF, applied=False) is True
    assert (guard.in_row, guard.total) == (2, 2)
    message = guard.message(3, loss=2.0, grad_norm=INF)
    assert "step 3" in message and "update skipped (2 in a row" in message
    assert guard.check(step=4, loss=1.5, grad_norm=0.5, applied=True) is False
    assert (guard.in_row, guard.total) == (0, 2)


def test_max_in_a_row_stops_with_the_setting_named():
    guard = NonFiniteGuard(max_in_row=2)
    guard.check(step=5, loss=NAN, grad_norm=INF, applied=False)
    with pytest.raises(TrainingDiverged, match=r"step 6: 2 steps in a row .*train.max_nonfinite_steps = 2") as err:
        guard.check(step=6, loss=NAN, grad_norm=INF, applied=False)
    assert err.value.exit_code == 4


def test_an_applied_non_finite_update_stops_at_once():
    with pytest.raises(TrainingDiverged, match="applied the update"):
        NonFiniteGuard(max_in_row=3).check(step=1, loss=NAN, grad_norm=INF, applied=True)


def test_nan_fault_hook_fires_on_its_rank_point_and_steps_only(monkeypatch):
    monkeypatch.setenv(watchdog.FAULT_ENV, "nan:loss:1:3-5")
    fired = [s for s in range(1, 8) if watchdog.fault_point("loss", rank=1, step=s)]
    assert fired == [3, 4, 5]
    assert not watchdog.fault_point("loss", rank=0, step=3)
    assert not watchdog.fault_point("before_shards", rank=1, step=3)
    monkeypatch.setenv(watchdog.FAULT_ENV, "nan:loss:0:2")
    assert [s for s in range(1, 5) if watchdog.fault_point("loss", rank=0, step=s)] == [2]
    monkeypatch.delenv(watchdog.FAULT_ENV)
    assert watchdog.fault_point("loss", rank=0, step=2) is False
