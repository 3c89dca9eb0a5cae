"""FanIn: engine outputs of a Triton request's n items folded into its one FINAL answer (pure, no Triton)."""

from __future__ import annotations

import random
import sys
import threading

import numpy as np
import pytest

from tessera.errors import CancelledError, RequestFailedError
from tessera.fanin import FanIn
from tessera.plan import RequestOutput
from tessera.request import FinishReason


def done(rid: str, steps: int, fill: int) -> RequestOutput:
    """A final success: a 4x4 image filled with `fill`, after `steps` steps."""
    image = np.full((4, 4, 3), fill, np.uint8)
    return RequestOutput(rid, True, steps, steps, image, None, FinishReason.COMPLETED)


def failed(rid: str, step: int = 1) -> RequestOutput:
    error = RequestFailedError(f"request {rid}: sampler update failed")
    return RequestOutput(rid, True, step, 10, None, error, FinishReason.ERROR)


def cancelled(rid: str, step: int = 1) -> RequestOutput:
    error = CancelledError("request cancelled")
    return RequestOutput(rid, True, step, 10, None, error, FinishReason.CANCELLED)


def progress(rid: str, step: int = 1) -> RequestOutput:
    return RequestOutput(rid, False, step, 10)


def test_fanin_answers_once_with_images_stacked_in_item_order():
    fanin = FanIn()
    ids = fanin.open(3, "client")[1]
    assert len(ids) == 3 and len(set(ids)) == 3 and len(fanin) == 1
    # finals arrive out of item order (a small image finishes first); steps differ per item
    assert fanin.settle(done(ids[2], 7, fill=30)) is None
    assert fanin.settle(done(ids[0], 5, fill=10)) is None
    answer = fanin.settle(done(ids[1], 6, fill=20))
    assert answer is not None and answer.final and answer.context == "client"
    assert answer.error is None and answer.cancel == ()
    assert answer.images.shape == (3, 4, 4, 3) and answer.images.dtype == np.uint8
    assert [int(answer.images[k, 0, 0, 0]) for k in range(3)] == [10, 20, 30]
    assert answer.steps.shape == (3, 1) and answer.steps.dtype == np.int32
    assert answer.steps.tolist() == [[5], [6], [7]]
    assert len(fanin) == 0
    assert fanin.settle(done(ids[1], 6, fill=20)) is None, "a repeated final is not answered twice"


def test_fanin_progress_relayed_only_for_single_item_requests_that_ask():
    fanin = FanIn()
    single = fanin.open(1, "single", progress=True)[1]
    quiet = fanin.open(1, "quiet", progress=False)[1]
    multi = fanin.open(2, "multi", progress=True)[1]
    event = progress(single[0], step=3)
    answer = fanin.settle(event)
    assert answer is not None and not answer.final and answer.context == "single" and answer.output is event
    assert answer.error is None
    assert fanin.settle(progress(quiet[0])) is None
    assert fanin.settle(progress(multi[0])) is None and fanin.settle(progress(multi[1])) is None
    assert len(fanin) == 3, "progress never ends a ticket"
    final = fanin.settle(done(single[0], 10, fill=1))
    assert final is not None and final.final and final.steps.tolist() == [[10]]


def test_fanin_first_error_answers_once_and_cancels_the_other_live_items():
    fanin = FanIn()
    ids = fanin.open(4, "client", progress=False)[1]
    other = fanin.open(2, "other")[1]  # another request's items are never cancelled
    assert fanin.settle(done(ids[0], 10, fill=1)) is None  # finished before the error: nothing to cancel
    bad = failed(ids[2])
    answer = fanin.settle(bad)
    assert answer is not None and answer.final and answer.images is None and answer.steps is None
    assert answer.output is bad and isinstance(answer.error, RequestFailedError)
    assert answer.cancel == (ids[1], ids[3])
    assert fanin.context(other[0]) == "other"
    fanin.refused(1, other, 0)  # "other" refused at its first item: freed
    assert len(fanin) == 1, "the ticket is held until the cancelled items' finals are absorbed"
    assert fanin.context(ids[1]) is None
    # the cancelled items end: one cancelled, one that finished anyway, one error of its own
    assert fanin.settle(progress(ids[1])) is None
    assert fanin.settle(cancelled(ids[1])) is None
    assert len(fanin) == 1
    assert fanin.settle(done(ids[3], 10, fill=4)) is None
    assert len(fanin) == 0


def test_fanin_second_error_of_a_failed_request_is_absorbed():
    fanin = FanIn()
    ids = fanin.open(2, "client")[1]
    first = fanin.settle(failed(ids[1]))
    assert first is not None and first.cancel == (ids[0],)
    assert fanin.settle(failed(ids[0])) is None
    assert len(fanin) == 0


def test_fanin_single_item_error_frees_the_ticket_and_stops_progress():
    fanin = FanIn()
    (rid,) = fanin.open(1, "client", progress=True)[1]
    answer = fanin.settle(failed(rid))
    assert answer is not None and answer.final and answer.cancel == ()
    assert len(fanin) == 0 and fanin.context(rid) is None
    assert fanin.settle(progress(rid)) is None


@pytest.mark.parametrize("submitted", [1, 2, 3])
def test_fanin_refused_returns_the_submitted_items_and_absorbs_their_finals(submitted):
    fanin = FanIn()
    ids = fanin.open(4, "client")[1]
    to_cancel, answer = fanin.refused(int(ids[0][1:].split("/")[0]), ids, submitted)
    assert answer
    assert to_cancel == ids[:submitted]
    assert len(fanin) == 1 and all(fanin.context(rid) is None for rid in ids)
    for k, rid in enumerate(to_cancel):
        assert fanin.settle(progress(rid)) is None
        end = cancelled(rid) if k % 2 == 0 else done(rid, 10, fill=k)  # cancelled, or finished anyway
        assert fanin.settle(end) is None
        assert len(fanin) == (0 if k == submitted - 1 else 1)
    assert fanin.settle(done(ids[-1], 10, fill=9)) is None, "an item never submitted is unknown"


def test_fanin_refused_first_item_frees_the_ticket_at_once():
    fanin = FanIn()
    ids = fanin.open(3, "client")[1]
    other = fanin.open(1, "other")[1]
    assert fanin.refused(int(ids[0][1:].split("/")[0]), ids, 0) == ((), True)
    assert len(fanin) == 1 and fanin.context(ids[0]) is None
    assert fanin.context(other[0]) == "other"


def test_fanin_context_is_none_for_failed_finished_and_unknown_items():
    fanin = FanIn()
    ok = fanin.open(2, "ok")[1]
    bad = fanin.open(2, "bad")[1]
    assert fanin.context(ok[0]) == "ok" and fanin.context(bad[1]) == "bad"
    fanin.settle(done(ok[0], 3, fill=0))
    assert fanin.context(ok[1]) == "ok", "a live item of an unfinished request keeps its handle"
    fanin.settle(done(ok[1], 3, fill=0))
    assert fanin.context(ok[0]) is None and fanin.context(ok[1]) is None
    fanin.settle(failed(bad[0]))
    assert fanin.context(bad[1]) is None
    assert fanin.context("r999/0") is None


def _settle_concurrently(seed: int):
    """50 two-item requests (a third failing), their outputs shuffled and settled by 8 threads at once."""
    fanin = FanIn()
    requests = [(f"c{i}", fanin.open(2, f"c{i}")[1]) for i in range(50)]
    outputs = []
    for i, (_, ids) in enumerate(requests):
        outputs += [progress(ids[0]), progress(ids[1])]
        if i % 3 == 0:
            outputs += [failed(ids[0]), cancelled(ids[1])]
        else:
            outputs += [done(ids[0], 4, 1), done(ids[1], 5, 2)]
    random.Random(seed).shuffle(outputs)
    answers, errors, lock = [], [], threading.Lock()
    start = threading.Barrier(8)

    def work(chunk):
        start.wait()
        for out in chunk:
            try:
                answer = fanin.settle(out)
            except Exception as e:  # noqa: BLE001 - reported by the caller
                errors.append(e)
                continue
            if answer is not None:
                with lock:
                    answers.append(answer)

    threads = [threading.Thread(target=work, args=(outputs[t::8],)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5.0)
    assert not any(t.is_alive() for t in threads)
    return fanin, [c for c, _ in requests], answers, errors


def test_fanin_threads_settling_concurrently_answer_each_request_once():
    """Exactly one FINAL answer per request, and nothing left behind. Threads switch as often as the
    interpreter allows (and the round is repeated), so unlocked read-modify-writes would interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for seed in range(8):
            fanin, contexts, answers, errors = _settle_concurrently(seed)
            assert errors == []
            assert len(answers) == 50 and all(a.final for a in answers)
            assert sorted(a.context for a in answers) == sorted(contexts)
            assert sum(a.images is not None for a in answers) == 50 - len(range(0, 50, 3))
            assert len(fanin) == 0
    finally:
        sys.setswitchinterval(interval)


def test_fanin_refusal_after_an_item_finished_or_failed():
    """Item 0 finished (or already answered the request with its error) before item 1 was refused: no
    KeyError, nothing left to cancel, and the refusal is sent only if nothing answered the request yet."""
    fanin = FanIn()
    key, ids = fanin.open(2, "client")
    fanin.settle(RequestOutput(ids[0], True, 4, 4, np.zeros((2, 2, 3), np.uint8), None, FinishReason.COMPLETED))
    assert fanin.refused(key, ids, 1) == ((), True) and len(fanin) == 0
    key, ids = fanin.open(2, "client")
    answer = fanin.settle(RequestOutput(ids[0], True, 1, 4, None, RuntimeError("x"), FinishReason.ERROR))
    assert answer is not None and answer.final
    assert fanin.refused(key, ids, 1) == ((), False) and len(fanin) == 0
