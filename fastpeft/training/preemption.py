"""Graceful preemption: SIGTERM, SIGINT and SIGUSR1 end training after the current optimizer step.

Schedulers send SIGTERM before a kill (SLURM, Kubernetes), SLURM can send SIGUSR1 ahead of time
(`--signal=USR1@120`), Ctrl-C sends SIGINT.  The first such signal sets a flag; the trainer finishes the
step it is in, writes a checkpoint and raises `TrainingPreempted`; `fastpeft train` prints the resume
command and exits with 128 + the signal number (130 SIGINT, 138 SIGUSR1, 143 SIGTERM), the shell's
convention for "ended by that signal".  A second signal does what it would have done without fastpeft,
at once (SIGTERM/SIGUSR1: the process dies; SIGINT: KeyboardInterrupt).  Signals the process ignores
(nohup) stay ignored.  Handlers can be installed only in the main thread; elsewhere nothing is changed.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class TrainingPreempted(Exception):
    """Training stopped by a signal after a complete step; `checkpoint` is the folder to resume from."""

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.total_steps, self.checkpoint = signum, step, total_steps, checkpoint
        self.exit_code = 128 + signum
        where = (f"checkpoint written to {checkpoint}" if checkpoint else
                 "nothing was saved (no output_dir)")
        super().__init__(f"stopped by {signal_name(signum)} after step {step}/{total_steps}; {where}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class PreemptionGuard:
    """Context manager: while active, the first SIGTERM/SIGINT/SIGUSR1 sets `signum` (and prints one
    line if `announce`); the second restores the previous handler and re-delivers the signal."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN or previous is None:  # ignored (nohup) or set from C: leave alone
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous)
            except (ValueError, TypeError):
                pass
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.announce:
                msg = (f"received {signal_name(signum)}: finishing the current step, then writing a checkpoint "
                       f"(send it again to stop at once)\n")
                try:
                    os.write(2, msg.encode())  # not print(): the main thread may be inside a stderr write
                except OSError:
                    pass
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, frame)  # Python's SIGINT default raises KeyboardInterrupt here
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
