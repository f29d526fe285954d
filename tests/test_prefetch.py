"""vitsink_jax.data.prefetch: the inline order at any depth and thread count, a worker's error
at its own step, nothing left running after close, a resume equal to a straight run, and the
measured wait; train_data.Batches computed by threads equal to inline."""

import random
import threading
import time

import numpy as np
import pytest

from vitsink_jax.data import instruct
from vitsink_jax.data.prefetch import Prefetch


def jittery(step):
    """A slow function of the step whose calls finish out of order."""
    time.sleep(random.Random(step).uniform(0, 0.01))
    return {"step": step, "thread": threading.current_thread().name}


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


@pytest.mark.parametrize("ahead,workers", [(0, 1), (1, 1), (2, 2), (4, 3), (3, 8)])
def test_items_come_in_the_inline_order(ahead, workers):
    with Prefetch(jittery, range(3, 40), ahead, workers) as feed:
        got = list(feed)
    assert [x["step"] for x in got] == list(range(3, 40))
    threads = {x["thread"] for x in got}
    if ahead:
        assert all(t.startswith("prefetch") for t in threads)
    else:
        assert threads == {threading.current_thread().name}
    with Prefetch(jittery, range(5), ahead, workers) as feed:
        assert [feed.get(k)["step"] for k in range(5)] == list(range(5))
        with pytest.raises(StopIteration):
            next(feed)


@pytest.mark.parametrize("ahead", [0, 3])
def test_an_error_surfaces_at_its_step_with_the_step_named(ahead):
    def fn(step):
        if step == 6:
            raise KeyError(f"bad record of {step}")
        return step

    with Prefetch(fn, range(10), ahead, 2) as feed:
        assert [feed.get(k) for k in range(6)] == list(range(6))  # the steps before it first
        with pytest.raises(KeyError, match="bad record of 6") as err:
            feed.get(6)
    assert any("computing the item of step 6" in note for note in err.value.__notes__)
    assert not prefetch_threads()
    with Prefetch(fn, range(3), ahead, 2) as feed, pytest.raises(ValueError, match="step 1; the next one is step 0"):
        feed.get(1)


def test_close_stops_the_threads_and_cancels_the_queued_steps():
    """Step 0 is quick, the others run until released: close (and leaving the ``with`` block,
    also by KeyboardInterrupt) cancels the queued steps and waits for the two running ones."""
    started, release = [], threading.Event()

    def fn(step):
        started.append(step)
        if step:
            release.wait(10)
        return step

    for interrupt in (False, True):
        started.clear()
        release.clear()
        t0 = time.perf_counter()
        try:
            with Prefetch(fn, range(100), ahead=6, workers=2) as feed:
                assert feed.get(0) == 0
                deadline = time.perf_counter() + 10
                while len(started) < 3 and time.perf_counter() < deadline:  # both workers busy
                    time.sleep(0.01)  # (on a loaded machine the second may start late)
                threading.Timer(0.3, release.set).start()
                if interrupt:
                    raise KeyboardInterrupt
                feed.close()
        except KeyboardInterrupt:
            assert interrupt
        assert time.perf_counter() - t0 >= 0.3    # waited for the running steps
        assert not prefetch_threads()
        assert sorted(started) == [0, 1, 2]       # steps 3-6 were queued: cancelled
    with pytest.raises(ValueError, match="closed"):
        next(feed)
    feed.close()                                  # idempotent


@pytest.mark.parametrize("n,batch", [(48, 20), (10, 8)])
def test_a_resume_gets_the_batches_of_a_straight_run(n, batch):
    """Batch order (instruct.batch_indices, whose epoch cache the threads share) computed ahead by
    several threads, from step 0 and from a resume at step s with a cold cache, equals the
    inline order, also across epochs."""
    def fn(step):
        return instruct.batch_indices(n, batch, step, [5, 0])

    instruct._LAST_ORDER.clear()
    straight = [fn(k) for k in range(40)]
    for start in (0, 7, 23):
        instruct._LAST_ORDER.clear()
        with Prefetch(fn, range(start, 40), ahead=4, workers=3) as feed:
            for k in range(start, 40):
                np.testing.assert_array_equal(feed.get(k), straight[k])


def test_the_wait_share_counts_the_time_spent_waiting():
    """A 30 ms producer and a 60 ms consumer: inline, a third of the consumer's time waits; two
    ahead, almost none (the first item, which always waits, is not counted)."""
    def fn(step):
        time.sleep(0.03)
        return step

    shares = {}
    for ahead in (0, 2):
        with Prefetch(fn, range(12), ahead, 2) as feed:
            waits = []
            for _ in feed:
                waits.append(feed.waited)
                time.sleep(0.06)
        shares[ahead] = feed.wait_share()
        assert waits[0] >= 0.025
    assert 0.2 < shares[0] < 0.45 and shares[2] < 0.05, shares
    with Prefetch(fn, range(1)) as feed:
        list(feed)
        assert feed.wait_share() is None
    with pytest.raises(ValueError, match="workers >= 1"):
        Prefetch(fn, range(3), 2, 0)


def test_train_batches_computed_by_threads_equal_the_inline_ones(tmp_path):
    from test_train import _batch_setup
    from vitsink_jax import train_data

    records, model, tok, cfg = _batch_setup(tmp_path, batch_size=20)
    inline = train_data.Batches(records, model, tok, cfg)
    with Prefetch(train_data.Batches(records, model, tok, cfg), range(6), ahead=4, workers=4) as feed:
        for k in range(6):
            got, ref = feed.get(k), inline(k)
            assert got.keys() == ref.keys()
            for key in ref:
                np.testing.assert_array_equal(got[key], ref[key])
