"""Whether the monitor's own passes are moving: the rule behind ``monitor_stalled``.

A pass (drift, join) is stalled when closed windows wait for it and its pointer has
not moved for ``stall_ms``: a segment lost from the store, a replica that stopped
summarising, a bug that fails every step. Quiet traffic is not a stall (nothing
waits), and neither is a pass working through a backlog (its pointer moves). Pure:
the analysis stage (monitor/analysis.py) reads the pointers and commits the signals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from monitor.incidents import Severity, Signal

__all__ = ["KIND", "ProgressWatch", "Stage"]

KIND = "monitor_stalled"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pass as seen at one check.

    Attributes:
        name: ``drift`` or ``join``.
        pointer: the end of its last decided window (None: nothing decided yet).
        bound: how far it could go (None: nothing closed or matured yet).
        waiting: starts of the closed windows it has not decided, ascending.
        waiting_for: the replicas whose summaries it waits for, other than this one.
        window: the window those summaries are for (ISO), when it waits for any.
    """

    name: str
    pointer: int | None
    bound: int | None
    waiting: Sequence[int]
    waiting_for: Sequence[str] = ()
    window: str | None = None


class ProgressWatch:
    """Remembers when each pass last moved; turns each check into a signal.

    Args:
        stall_ms: how long a pass may stand still with windows waiting.
    """

    def __init__(self, stall_ms: int) -> None:
        self.stall_ms = stall_ms
        #: pass -> (its pointer when last seen, when it last moved or had nothing waiting).
        self._progress: dict[str, tuple[int | None, float]] = {}

    def idle_s(self, stage: Stage, now_s: float) -> float:
        """Seconds the pass has stood still with windows waiting (0 when it moved)."""
        seen, since = self._progress.get(stage.name, (None, now_s))
        if stage.pointer != seen or not stage.waiting:
            since = now_s
        self._progress[stage.name] = (stage.pointer, since)
        return now_s - since

    def stalled(self, idle_s: float) -> bool:
        return idle_s * 1000 > self.stall_ms

    def signal(self, stage: Stage, idle_s: float, *, last_error: str | None,
               iso: Any) -> Signal:
        """The check as a ``monitor_stalled/*/<pass>`` signal (critical; firing or clean)."""
        firing = self.stalled(idle_s)
        first = stage.waiting[0] if stage.waiting else (stage.pointer or 0)
        return Signal(
            KIND, "*", stage.name, firing, first, stage.bound or first, Severity.CRITICAL,
            summary=reason(stage, idle_s, last_error, iso) if firing else "",
            evidence={"stage": stage.name, "idle_s": round(idle_s), "windows_waiting": len(stage.waiting),
                      "analysed_upto": None if stage.pointer is None else iso(stage.pointer),
                      "waiting_for": _waiting_for(stage), "last_error": last_error})


def reason(stage: Stage, idle_s: float, last_error: str | None, iso: Any) -> str:
    """What /readyz and the page say: the pass, how long, how much waits, and why."""
    why = ""
    if stage.waiting_for:
        why = f"; waiting for the summaries of {', '.join(stage.waiting_for)} for window {stage.window}"
    if last_error:
        why += f"; the last error: {last_error[:200]}"
    idle = f"{idle_s:.0f} s" if idle_s < 120 else f"{idle_s / 60:.0f} min"
    start = f", from {iso(stage.waiting[0])}" if stage.waiting else ""
    return (f"{stage.name} analysis has made no progress for {idle} with "
            f"{len(stage.waiting)} closed window(s) waiting{start}{why}")


def _waiting_for(stage: Stage) -> Mapping[str, Any] | None:
    if not stage.waiting_for:
        return None
    return {"window": stage.window, "replicas": list(stage.waiting_for)}
