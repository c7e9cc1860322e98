"""Clean exits on SIGINT/SIGTERM for the command line, from its first instruction on.

``install()`` runs first thing in ``python -m tfm_jax`` and in :func:`tfm_jax.cli.main` (before
jax is imported). Until the training loop takes over with its own flag-only handler (which
finishes the step, saves a checkpoint and raises ``train.Interrupted``), a signal ends the
process at once: one line on stderr -- what was interrupted and what was or was not saved
(:func:`note` keeps that current) -- and exit status ``128 + signum`` (130 SIGINT, 143 SIGTERM).

Why not an exception (Python's ``KeyboardInterrupt``): a signal lands between any two bytecodes,
also inside the initialisation of C extensions (importing jaxlib takes a second or two), which
then fails with ``ImportError`` or crashes; and interpreter teardown with XLA's threads running
can itself crash (SIGSEGV, exit 139). Before the loop nothing is being saved, and what the CLI
writes there is written atomically, so stopping right away loses nothing: the handler flushes
and leaves with ``os._exit``.

Standard library only: it must be importable before anything heavy.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_where = ""
_previous: dict[int, object] = {}


def installed() -> bool:
    return bool(_previous)


def install() -> None:
    """Route SIGINT/SIGTERM to :func:`exit_on_signal` (main thread only; idempotent)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        old = signal.signal(sig, exit_on_signal)
        if old is not exit_on_signal:
            _previous[sig] = old


def uninstall() -> None:
    """Restore the handlers :func:`install` replaced."""
    while _previous:
        sig, old = _previous.popitem()
        signal.signal(sig, old)


def note(where: str) -> None:
    """What an interrupt now would cut short, e.g. ``"before step 1, nothing saved"``."""
    global _where
    _where = where


def message(signum: int, where: str | None = None) -> str:
    where = _where if where is None else where
    return f"interrupted by {signal.Signals(signum).name}" + (f" {where}" if where else "")


def exit_now(code: int, line: str = "") -> None:
    """Flush stdout/stderr, write ``line`` to stderr and exit at once (no teardown)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:   # a closed pipe, or a write this signal interrupted
            pass
    if line:
        try:
            os.write(2, ("\n" + line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass
    os._exit(code)


def exit_on_signal(signum, frame=None, where: str | None = None) -> None:
    """Signal handler: report in one line and exit with ``128 + signum``."""
    for sig in SIGNALS:             # a second signal while exiting changes nothing
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:
            pass
    exit_now(128 + signum, f"tfm-jax: {message(signum, where)}")
