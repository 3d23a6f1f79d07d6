"""The verdict between validation and publishing: decided once, and a refusal stops the
publisher wherever it is (no database here: the publisher's side is its callbacks)."""

from __future__ import annotations

import pytest
from streamflow.verdict import Rejected, Verdict


def test_a_hook_registered_after_the_refusal_runs_at_once():
    """The refusal can come before the publishing task has registered its cancels (a
    fast failure, an interrupt right after it was submitted): they ran never, and the
    publisher's writes went on for tens of seconds at 1M rows."""
    verdict = Verdict()
    verdict.reject()
    called = []

    verdict.on_reject(lambda: called.append("cancel"))

    assert called == ["cancel"]
    with pytest.raises(Rejected):
        verdict.stop_if_rejected()


def test_reject_after_accept_changes_nothing_and_cancels_nothing():
    verdict = Verdict()
    called = []
    verdict.on_reject(lambda: called.append("cancel"))
    verdict.accept()

    verdict.reject()

    assert verdict.wait() is True and called == []


def test_an_accept_cut_short_is_no_accept():
    """An interrupt between the two steps of accept (the flag set, the event not) used
    to leave wait() answering True after the refusal that followed."""
    verdict = Verdict()
    verdict._accepted = True  # what accept had done when the interrupt came

    verdict.reject()

    assert verdict.wait() is False


def test_a_hook_that_fails_does_not_fail_the_refusal():
    verdict = Verdict()
    verdict.on_reject(lambda: 1 / 0)
    verdict.reject()
    assert verdict.rejected


def test_deciding_accepts_a_block_that_ends_and_rejects_one_that_raises():
    accepted = Verdict()
    with accepted.deciding():
        pass
    assert accepted.wait(every=0.01) is True

    waited: list[str] = []
    refused = Verdict()
    with pytest.raises(KeyboardInterrupt), refused.deciding(then=lambda: waited.append("yes")):
        raise KeyboardInterrupt  # an interrupt during validation refuses the month too
    assert refused.rejected and waited == ["yes"]
    assert refused.wait(every=0.01) is False
