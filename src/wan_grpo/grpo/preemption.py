"""Stop requests: SIGTERM, SIGINT and SIGUSR1 (what SLURM sends before a time limit).

The first such signal asks the run to stop at the end of the current rollout's optimizer steps:
every rank agrees on it (one all-reduce per rollout), a checkpoint is written, and the process
exits with ``PREEMPTED_EXIT`` so a job script can requeue it with ``--resume auto``. A second
SIGINT (Ctrl-C twice) stops at once, keeping only the checkpoints already written.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

from wan_grpo.distributed import all_reduce_sum

log = logging.getLogger("wan_grpo")

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after writing ``checkpoint``; the CLI exits with PREEMPTED_EXIT."""

    def __init__(self, signal_name: str, checkpoint):
        super().__init__(f"stopped by {signal_name} after writing {checkpoint}; resume with --resume auto")
        self.checkpoint = checkpoint


class StopRequests:
    """Installs the handlers for a ``with`` block (main thread only) and restores the previous ones."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._depth = 0  # nested ``with`` blocks (the CLI's and the trainer's) install the handlers once

    def __enter__(self):
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}
        return False

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            log.warning("%s received: stopping after this rollout's optimizer steps and writing a checkpoint",
                        signal.Signals(signum).name)
        self.received = signum

    def agreed(self) -> bool:
        """Whether any rank received a stop signal (a collective: every rank calls it at the same point)."""
        return bool(all_reduce_sum(torch.tensor([int(self.received is not None)]))[0])

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
