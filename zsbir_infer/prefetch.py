"""Decode-ahead on worker threads, safe under Ctrl-C: the one pipeline behind :meth:`Encoder.embed_stream`
and the indexer.

    with closing(prefetch(groups, workers=4, in_flight=3, name="zsbir-decode")) as it:
        for tag, outcomes in it:          # in the order of ``groups``
            values = [o.result() for o in outcomes]

``groups`` yields ``(tag, tasks)``: a tag passed through untouched (a batch's start and buffer) and the
zero-argument callables of that group, run on the worker threads. At most ``in_flight`` groups are
submitted and not yet yielded; a group is pulled from ``groups`` (and so its buffer allocated) only when it
is submitted. Each task's return value or exception comes back as an :class:`Outcome`.

Why not :class:`concurrent.futures.ThreadPoolExecutor`: its futures, its idle semaphore and thread start-up
all wait on :class:`threading.Condition`, whose ``__enter__`` is Python code. A ``KeyboardInterrupt`` that
lands just after the lock is taken and before the ``with`` block starts leaves the lock held by the main
thread forever; the worker then blocks in ``Future.set_result`` (or in the semaphore's release) and
``shutdown(wait=True)`` -- or the interpreter's exit, which joins the executor's threads even after
``shutdown(wait=False)`` -- waits on it forever. That is the Ctrl-C hang of ``zsbir index`` under load.

Here the consumer and the workers share no Python-level lock: tasks and results travel through
:class:`queue.SimpleQueue` (C, reentrant, ``put`` never blocks), the stop flag is a plain attribute read,
and the workers are daemon threads, so neither closing the pipeline nor the interpreter's exit ever waits
on a worker. On ``KeyboardInterrupt`` (or any exception) in the consumer, on ``close()``, or when ``stop``
is set (checked between groups; the pipeline then raises ``KeyboardInterrupt``), it stops submitting,
drops the tasks not yet started, tells the workers to exit and returns at once; a task already running
finishes on its own into a buffer nobody reads.

Ctrl-C: while a pipeline runs in the main thread and SIGINT has Python's default handler, the first Ctrl-C
only sets the stop flag, so the interrupt surfaces between groups (the consumer finishes -- an indexer
commits -- the group it holds) and never inside a lock; a second Ctrl-C interrupts at once, as usual.
The handler is put back when the pipeline ends.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Generic, TypeVar, cast

__all__ = ["Outcome", "prefetch"]

K = TypeVar("K")
R = TypeVar("R")


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """A task's return value, or the exception it raised."""

    value: R | None = None
    error: BaseException | None = None

    def result(self) -> R:
        """The value; re-raises the task's exception."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class _Shared:
    """State the workers read without a lock: set ``closed`` and they exit before their next task."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


_Task = tuple[int, Callable[[], object]]


def _worker(
    tasks: queue.SimpleQueue[_Task | None], results: queue.SimpleQueue[tuple[int, Outcome[object]]], shared: _Shared
) -> None:
    while True:
        item = tasks.get()
        if item is None or shared.closed:
            return
        seq, fn = item
        try:
            out: Outcome[object] = Outcome(value=fn())
        except BaseException as exc:  # handed to the consumer, which re-raises it in its own thread
            out = Outcome(error=exc)
        del fn, item
        results.put((seq, out))


def prefetch(
    groups: Iterable[tuple[K, Sequence[Callable[[], R]]]],
    *,
    workers: int,
    in_flight: int,
    name: str = "zsbir-prefetch",
    stop: threading.Event | None = None,
) -> Generator[tuple[K, list[Outcome[R]]], None, None]:
    """Run the tasks of ``groups`` on ``workers`` threads, at most ``in_flight`` groups ahead, and yield
    ``(tag, outcomes)`` per group in order. See the module docstring for the Ctrl-C guarantees; wrap the
    iterator in :func:`contextlib.closing` so that an exception in the consumer's loop body stops it at once.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    return _prefetch(iter(groups), workers, in_flight, name, stop)


def _prefetch(
    groups: Iterator[tuple[K, Sequence[Callable[[], R]]]],
    workers: int,
    in_flight: int,
    name: str,
    stop: threading.Event | None,
) -> Generator[tuple[K, list[Outcome[R]]], None, None]:
    tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
    results: queue.SimpleQueue[tuple[int, Outcome[object]]] = queue.SimpleQueue()
    shared = _Shared()
    threads: list[threading.Thread] = []
    pending: deque[tuple[K, int, int]] = deque()  # (tag, first task's number, number of tasks)
    done: dict[int, Outcome[object]] = {}
    next_seq = 0
    ctrl_c = threading.Event()
    restore = _catch_first_sigint(ctrl_c, shared)

    def submit() -> bool:
        nonlocal next_seq
        group = next(groups, None)
        if group is None:
            return False
        tag, fns = group
        first = next_seq
        for fn in fns:
            tasks.put((next_seq, fn))
            next_seq += 1
            # One more thread per task until there are ``workers`` (as ThreadPoolExecutor starts them).
            if len(threads) < workers and len(threads) < next_seq:
                t = threading.Thread(
                    target=_worker, args=(tasks, results, shared), name=f"{name}_{len(threads)}", daemon=True
                )
                threads.append(t)
                t.start()
        pending.append((tag, first, next_seq - first))
        return True

    try:
        for _ in range(in_flight):
            if not submit():
                break
        while pending:
            if ctrl_c.is_set() or (stop is not None and stop.is_set()):
                raise KeyboardInterrupt
            tag, first, count = pending.popleft()
            for seq in range(first, first + count):
                while seq not in done:
                    got, out = results.get()
                    done[got] = out
            outcomes = cast("list[Outcome[R]]", [done.pop(seq) for seq in range(first, first + count)])
            submit()
            yield tag, outcomes
            del outcomes
    finally:
        # Never wait here: a worker may be stuck in a task (or, after an untimely interrupt, anywhere).
        shared.closed = True
        pending.clear()
        done.clear()
        try:
            while True:
                tasks.get_nowait()  # the tasks not yet started
        except queue.Empty:
            pass
        for _ in threads:
            tasks.put(None)  # wakes the idle workers, which exit
        restore()


def _catch_first_sigint(flag: threading.Event, shared: _Shared) -> Callable[[], None]:
    """In the main thread, with Python's default SIGINT handler: make the first Ctrl-C set ``flag`` (and put
    the default back, so a second one interrupts at once). Returns the function that undoes it."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return _nothing

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, previous)
        if shared.closed:  # the pipeline ended without putting the handler back: interrupt as usual
            signal.default_int_handler(signum, frame)
        flag.set()

    signal.signal(signal.SIGINT, on_sigint)

    def restore() -> None:
        try:
            if signal.getsignal(signal.SIGINT) is on_sigint:
                signal.signal(signal.SIGINT, previous)
        except ValueError:  # closed from another thread; on_sigint then defers to the default handler
            pass

    return restore


def _nothing() -> None:
    return None
