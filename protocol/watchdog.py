"""Noticing a node that holds jobs but makes no progress: its compute thread hung while its IO
thread keeps heartbeating, so it never looks dead.

Each node's pace is measured from its own reports, per stage: the time from taking up a job (or
finishing the one before) to the job's first sign of progress (a step, or its result), and the time
between steps. A busy node that stays silent for longer than ``factor`` times the pace it is
expected to keep is stalled; never before ``timeout`` seconds, and for a stage the node has not run
yet (whose first job may compile kernels or fill caches), not before ``warmup`` times that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STALL_TIMEOUT = 60.0  # seconds: the least silence that makes a busy node stalled (--stall-timeout)
STALL_FACTOR = 10.0  # the silence allowed, in multiples of the node's own measured pace
WARMUP_FACTOR = 10.0  # a stage not measured on the node yet: this many times STALL_TIMEOUT
SMOOTHING = 0.25  # weight of the newest measurement in the running average


@dataclass
class Pace:
    """How fast one node works, from its own reports, and when it last showed progress."""

    setup: dict[str, float] = field(default_factory=dict)  # stage -> seconds from taking a job up to its first sign
    step: dict[str, float] = field(default_factory=dict)  # stage -> seconds per step
    last_sign: float = 0.0  # last progress report or job end, or when it took up work while idle
    last_done: float = 0.0  # when it last finished a job: the next one it holds starts then
    stepping: str | None = None  # the stage whose next step is awaited; None: a job's first sign is

    def took_up(self, now: float) -> None:
        """The node was idle and got a job: the wait for its first sign starts now."""
        self.last_sign = now
        self.stepping = None

    def first_sign(self, stage: str, assigned_at: float, now: float) -> None:
        """A job's first step or its result arrived; it started when assigned or when the job before it ended."""
        _smooth(self.setup, stage, now - max(assigned_at, self.last_done))

    def stepped(self, stage: str, steps: int, seconds: float, now: float) -> None:
        """``steps`` more steps of a job took ``seconds`` (0 steps: its first report, nothing to time)."""
        if steps > 0:
            _smooth(self.step, stage, seconds / steps)
        self.last_sign = now
        self.stepping = stage

    def finished(self, now: float) -> None:
        self.last_sign = self.last_done = now
        self.stepping = None


def _smooth(averages: dict[str, float], stage: str, seconds: float) -> None:
    seconds = max(seconds, 0.0)
    old = averages.get(stage)
    averages[stage] = seconds if old is None else (1 - SMOOTHING) * old + SMOOTHING * seconds


@dataclass(frozen=True)
class StallPolicy:
    timeout: float = STALL_TIMEOUT
    factor: float = STALL_FACTOR
    warmup: float = WARMUP_FACTOR

    def limit(self, pace: Pace, stage: str | None) -> float:
        """Seconds a busy node may stay silent, waiting on ``stage`` (None: a stage not known)."""
        if pace.stepping is not None:
            measured = pace.step.get(pace.stepping)
        elif stage is not None:
            measured = pace.setup.get(stage)
        else:
            measured = max(pace.setup.values(), default=None)
        if measured is None:
            return self.timeout * self.warmup
        return max(self.timeout, self.factor * measured)
