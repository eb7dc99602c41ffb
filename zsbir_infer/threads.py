"""How many threads to use: the one place that counts the CPUs this process may run on."""

from __future__ import annotations

import os

__all__ = ["THREAD_ENV_VARS", "default_threads", "usable_cpus"]

#: Environment variables that set the inference thread count, first match wins.
THREAD_ENV_VARS: tuple[str, ...] = ("ZSBIR_NUM_THREADS", "OMP_NUM_THREADS")


def usable_cpus() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, n)


def default_threads(cap: int | None = None, *, from_env: bool = False) -> int:
    """A thread count: :func:`usable_cpus`, at most ``cap`` when given.

    With ``from_env``, a positive integer in ``ZSBIR_NUM_THREADS`` (else ``OMP_NUM_THREADS``) wins and is
    not capped; values that are not positive integers are ignored.
    """
    if from_env:
        for var in THREAD_ENV_VARS:
            value = os.environ.get(var, "").strip()
            try:
                n = int(value) if value else 0
            except ValueError:
                continue
            if n > 0:
                return n
    n = usable_cpus()
    return n if cap is None else max(1, min(cap, n))
