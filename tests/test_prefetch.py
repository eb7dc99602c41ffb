"""The decode-ahead pipeline shared by the encoder and the indexer: order, bounded look-ahead, errors, and
Ctrl-C (an interrupt in the consumer, or the stop flag) that never waits on a worker."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing

import pytest

from zsbir_infer.prefetch import Outcome, prefetch


def _sleepy(value: int, rng: random.Random) -> Callable[[], int]:
    delay = rng.uniform(0, 0.002)

    def task() -> int:
        time.sleep(delay)
        return value

    return task


@pytest.mark.parametrize(("workers", "in_flight"), [(1, 1), (2, 3), (4, 2), (8, 5)])
def test_groups_come_back_in_order_with_bounded_look_ahead(workers: int, in_flight: int) -> None:
    rng = random.Random(workers * 10 + in_flight)
    pulled: list[int] = []

    def groups() -> Iterator[tuple[int, list[Callable[[], int]]]]:
        for g in range(40):
            pulled.append(g)
            yield g, [_sleepy(g * 100 + k, rng) for k in range(g % 5)]  # empty groups too

    seen = []
    with closing(prefetch(groups(), workers=workers, in_flight=in_flight, name="t-order")) as it:
        for g, outcomes in it:
            assert len(pulled) <= g + 1 + in_flight  # pulled (and so allocated) only when submitted
            assert [o.result() for o in outcomes] == [g * 100 + k for k in range(g % 5)]
            seen.append(g)
    assert seen == list(range(40))
    assert len({t.name for t in threading.enumerate() if t.name.startswith("t-order")}) <= workers


def test_a_task_error_comes_back_in_its_place() -> None:
    def bad() -> int:
        raise ValueError("no")

    groups = [("a", [lambda: 1, bad, lambda: 3])]
    [(tag, outcomes)] = list(prefetch(groups, workers=2, in_flight=2))
    assert tag == "a" and outcomes[0] == Outcome(value=1) and outcomes[2].result() == 3
    assert isinstance(outcomes[1].error, ValueError)
    with pytest.raises(ValueError, match="no"):
        outcomes[1].result()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="workers"):
        prefetch([], workers=0, in_flight=1)
    with pytest.raises(ValueError, match="in_flight"):
        prefetch([], workers=1, in_flight=0)


def test_the_stop_flag_raises_keyboard_interrupt_between_groups_and_drops_the_rest() -> None:
    stop = threading.Event()
    ran: list[int] = []
    gate = threading.Event()

    def task(i: int) -> Callable[[], int]:
        def run() -> int:
            gate.wait(5)
            ran.append(i)
            return i

        return run

    groups = [(g, [task(g)]) for g in range(50)]
    it = prefetch(groups, workers=1, in_flight=10, stop=stop)
    gate.set()
    assert next(it)[0] == 0
    stop.set()
    with pytest.raises(KeyboardInterrupt):
        next(it)
    time.sleep(0.05)
    assert len(ran) <= 12  # the ten in flight at most, never the 40 not yet submitted


def test_an_interrupt_in_the_consumer_never_waits_on_a_stuck_worker() -> None:
    release = threading.Event()
    started = threading.Event()

    def stuck() -> None:
        started.set()
        release.wait(60)

    it = prefetch([(0, [lambda: None]), (1, [stuck]), (2, [lambda: None])], workers=2, in_flight=3)
    next(it)
    assert started.wait(5)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        it.throw(KeyboardInterrupt())  # as if Ctrl-C landed in the consumer's loop body
    it.close()
    assert time.monotonic() - t0 < 1.0
    release.set()


def test_the_interpreter_exits_though_a_worker_is_stuck() -> None:
    """A worker blocked for good (as one stuck in a lock the interrupted main thread still holds) delays
    neither the pipeline's shutdown nor the process's exit (a ThreadPoolExecutor's exit joins its workers)."""
    script = textwrap.dedent(
        """
        import threading
        from contextlib import closing
        from zsbir_infer.prefetch import prefetch

        never = threading.Event()
        groups = ((g, [never.wait] if g == 1 else [lambda: g]) for g in range(10))
        try:
            with closing(prefetch(groups, workers=2, in_flight=3)) as it:
                for g, _ in it:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "interrupted" in done.stdout, done.stderr


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handler, whatever this process inherited (a job started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python then keeps it ignored)."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_first_ctrl_c_stops_between_groups_and_a_second_interrupts_at_once(python_sigint: None) -> None:
    """In the main thread the first SIGINT only sets the stop flag: the consumer finishes the group it holds,
    the next step raises KeyboardInterrupt; during a pipeline a second SIGINT raises where it lands; the
    default handler is back afterwards."""
    assert threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT)
    assert before is signal.default_int_handler
    groups = [(g, [lambda g=g: g]) for g in range(20)]
    finished: list[int] = []
    with pytest.raises(KeyboardInterrupt), closing(prefetch(groups, workers=2, in_flight=3)) as it:
        for g, outcomes in it:
            if g == 2:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler has run by now: no KeyboardInterrupt inside the body
            finished.append(outcomes[0].result())
    assert finished == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Two Ctrl-C in one group: the second raises in the consumer's body.
    reached: list[int] = []
    with pytest.raises(KeyboardInterrupt), closing(prefetch(groups, workers=2, in_flight=3)) as it:
        for g, _ in it:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached.append(g)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached.append(-1)  # never: the second interrupt landed above
    assert reached == [0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_pipeline_in_another_thread_leaves_sigint_alone(python_sigint: None) -> None:
    seen: list[object] = []

    def run() -> None:
        with closing(prefetch([(0, [lambda: 0])], workers=1, in_flight=1)) as it:
            for _ in it:
                seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert seen == [signal.default_int_handler]
