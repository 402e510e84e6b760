"""Fault injection for tests: deliver a signal to this process at a chosen point of a run.

``CAFEDIST_FAULT=<signal>@<point>:<round>[:<rank>]`` (comma-separated for several), where
signal is ``kill`` (SIGKILL), ``term`` (SIGTERM), ``usr1`` (SIGUSR1) or ``stop`` (SIGSTOP:
the process stays alive, holding its lock, until SIGCONT or SIGKILL) and point is
``local`` (a round starts) or ``checkpoint`` (the shards of a checkpoint are written but the
checkpoint is not yet committed). Examples: ``kill@checkpoint:3``, ``kill@local:4:1`` (only
rank 1), ``term@local:2`` (like a Slurm preemption). Unset, a call costs one dict lookup.
Used by the kill/resume, dead-rank, preemption and status tests.
"""

from __future__ import annotations

import os
import signal

_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr1": signal.SIGUSR1, "stop": signal.SIGSTOP}


def maybe_fault(point: str, round_idx: int, rank: int) -> None:
    """Send the configured signal to this process if ``CAFEDIST_FAULT`` names this moment."""
    spec = os.environ.get("CAFEDIST_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        sig, _, where = item.strip().partition("@")
        parts = where.split(":")
        if len(parts) < 2 or sig not in _SIGNALS or parts[0] != point or int(parts[1]) != round_idx:
            continue
        if len(parts) > 2 and int(parts[2]) != rank:
            continue
        os.kill(os.getpid(), _SIGNALS[sig])
