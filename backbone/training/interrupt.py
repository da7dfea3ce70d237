"""Graceful stops: Ctrl-C (SIGINT) and SIGTERM end a run at the next safe point, after a checkpoint.

The long loops (``backbone.training.loop.train``, the SB3 callbacks of ``agents.rl``) run inside
:func:`deferred_stop`: a signal there only sets a flag, which the loop checks after each step; it
then saves a checkpoint and raises :class:`Interrupted` (PPO waits for the end of its rollout, where
its state is complete). Outside such a loop (loading data,
evaluating) a signal raises ``KeyboardInterrupt`` at once, which loses nothing: every file is
written atomically, and a stage that did not finish is redone on ``--resume``. A second signal
stops at once, except that under torchrun a second signal within ``FORWARD_WINDOW_S`` of the
first counts as the same request: Ctrl-C reaches every worker from the terminal and again from
torchrun, which forwards what it receives (and SIGKILLs workers 30 s later).

The handlers are installed by the experiment CLIs (:func:`install_signal_handlers`); a library user
who wants the same behaviour calls it too. Without it, signals keep Python's default behaviour.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time


class Interrupted(KeyboardInterrupt):
    """A run stopped on a signal after saving its checkpoint (the message says where)."""


_deferring = 0  # nesting depth of deferred_stop() sections
_requested: str | None = None  # name of the signal received inside one
_requested_at = 0.0  # when (time.monotonic)
FORWARD_WINDOW_S = 5.0


def _handle(signum: int, frame) -> None:
    global _requested, _requested_at
    name = signal.Signals(signum).name
    if _deferring and _requested is None:
        _requested, _requested_at = name, time.monotonic()
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for the job
            print(f"\n{name}: stopping at the next safe point, after a checkpoint (send it again to stop at once)",
                  file=sys.stderr, flush=True)
        return
    forwarded = "RANK" in os.environ and time.monotonic() - _requested_at < FORWARD_WINDOW_S
    if _deferring and forwarded:
        return
    raise KeyboardInterrupt(f"{name} received")


def install_signal_handlers() -> None:
    """Route SIGINT and SIGTERM through :func:`_handle` (only possible in the main thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handle)
        signal.signal(signal.SIGTERM, _handle)


@contextlib.contextmanager
def deferred_stop():
    """A section whose loop checks :func:`stop_requested` after each step and stops cleanly."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def stop_requested() -> str | None:
    """The name of the signal that asked the current loop to stop, or None."""
    return _requested


def request_stop(name: str = "SIGINT") -> None:
    """Ask the running loop to stop as a signal would (for tests and embedding applications)."""
    global _requested
    _requested = name


def clear_stop() -> None:
    """Forget a handled stop request (a new run in the same process starts clean)."""
    global _requested
    _requested = None
