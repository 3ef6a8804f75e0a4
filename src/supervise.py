"""Process supervision for a stage: SIGTERM as Ctrl-C, and stopping when the dvc process that
started the stage is gone.

`dvc repro` does not pass a SIGTERM on to its stage, and an orphaned training would go on alone,
racing the next `dvc repro` for the same checkpoints; so a stage run by DVC watches its parent
chain and stops itself (then, if its clean-up hangs, exits hard).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

ABANDON_GRACE = 60.0
ABANDON_HOOK_WAIT = 15.0
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "fish", "ksh", "mksh"})
STOP_WAIT = ABANDON_GRACE + ABANDON_HOOK_WAIT  # the longest an interrupted stage takes to stop


@contextlib.contextmanager
def sigterm_as_interrupt(on_abandon: Callable[[], None] | None = None) -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C (KeyboardInterrupt), so a killed stage still marks its MLflow
    run and shuts Ray down; the next run resumes from the last checkpoint.

    Run by DVC (DVC_STAGE set), the stage also stops this way when the dvc process that started
    it dies: `dvc repro` does not pass a SIGTERM on to its stage, and an orphaned training
    would go on alone, racing the next `dvc repro` for the same checkpoints. Should the stage
    still be alive ABANDON_GRACE s later (its clean-up stuck), it prints every thread's stack,
    calls `on_abandon` (e.g. mark the MLflow run KILLED) and exits at once; the processes of a
    Ray instance it started share its fate.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    done = threading.Event()
    if os.environ.get("DVC_STAGE"):
        watch = threading.Thread(
            target=_stop_with_parent,
            args=(launcher_chain(), done, on_abandon),
            name="parent-watch",
            daemon=True,
        )
        watch.start()
    try:
        yield
    finally:
        done.set()
        signal.signal(signal.SIGTERM, previous)


def launcher_chain(limit: int = 4) -> list[int]:
    """The pids from this process's parent up to the first one that is not a shell: the
    process that started the stage. DVC runs a stage as `$SHELL -c CMD`, and some shells
    (/bin/sh as dash, where SHELL is unset) do not exec CMD but wait for it: the stage's parent
    is then a shell that lives on when dvc dies."""
    import psutil

    chain = [os.getppid()]
    with contextlib.suppress(psutil.Error):
        while len(chain) < limit and psutil.Process(chain[-1]).name() in SHELLS:
            chain.append(psutil.Process(chain[-1]).ppid())
    return chain


def _chain_holds(chain: list[int]) -> bool:
    """Every process of `chain` is still the parent of the one before it (a process whose
    parent dies is re-parented, so a broken link means an ancestor is gone)."""
    import psutil

    if os.getppid() != chain[0]:
        return False
    try:
        return all(psutil.Process(c).ppid() == p for c, p in itertools.pairwise(chain))
    except psutil.Error:
        return False


def _stop_with_parent(
    chain: list[int],
    done: threading.Event,
    on_abandon: Callable[[], None] | None = None,
    every: float = 0.5,
) -> None:
    """SIGTERM this process once the process that started it is gone (`chain`: see
    launcher_chain), unless `done`; exit hard if it is still here ABANDON_GRACE s later,
    whether its clean-up or its exit hung."""
    import faulthandler

    while not done.wait(every):
        if not _chain_holds(chain):
            break
    else:
        return
    # The backstop needs no GIL: faulthandler's own C thread dumps the stacks and exits should
    # the Python below never run again (a C call that holds the GIL and hangs).
    faulthandler.dump_traceback_later(ABANDON_GRACE + ABANDON_HOOK_WAIT + 5.0, exit=True)
    deadline = time.monotonic() + ABANDON_GRACE
    # to the main thread itself: a signal another thread takes does not wake a blocked call
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    stopped = done.wait(ABANDON_GRACE)
    # after a clean stop the process exits by itself; its exit can hang too (a non-daemon
    # thread, an atexit hook), so the deadline holds either way
    time.sleep(max(0.0, deadline - time.monotonic()))
    print(
        f"error: interrupted: the dvc process that ran this stage is gone and the stage did not "
        f"{'exit' if stopped else 'stop'} within {ABANDON_GRACE:.0f} s; stopping hard "
        f"(stacks below)",
        file=sys.stderr,
        flush=True,
    )
    faulthandler.dump_traceback(all_threads=True)
    if on_abandon is not None and not stopped:
        last = threading.Thread(target=on_abandon, name="abandon", daemon=True)
        last.start()
        last.join(ABANDON_HOOK_WAIT)
    os._exit(143)
