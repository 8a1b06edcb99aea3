"""Where a run's wall clock goes: seconds per phase, as one line (infer.py --profile).

A user waits from the command to the printed metrics; the decode loop is only part of that. A
:class:`Stopwatch` adds up the seconds of named phases (a phase may repeat: every batch's wait for
the DataLoader adds to one "data wait") and prints them in the order first seen, with the
process's start-up before them and "other" (whatever no phase covered) after, so the line adds
up to the total a user waited. Host clocks only: a phase that launches GPU work is timed up to
its next sync (the decoder's results are copied to the CPU at the end of each batch).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process was started (Linux: /proc), or None where that is unknown:
    interpreter start-up and the imports before any code of ours runs are part of a user's wait."""
    try:
        with open("/proc/self/stat") as f:
            # field 22, start time in clock ticks after boot; the command name (field 2) may hold spaces
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Stopwatch:
    """Seconds per named phase since it was created; `line()` is the summary."""

    def __init__(self):
        self.started = time.perf_counter()
        self.start_up = seconds_since_process_start()  # before this object existed
        self.seconds: dict[str, float] = {}
        self.parts: dict[str, dict[str, float]] = {}  # {phase: {part: seconds}}: what a long phase is made of

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    @contextmanager
    def part(self, phase: str, name: str):
        """Time a part of `phase` (which is timed on its own): printed as a line of its own by lines(), so
        the main line still adds up."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            parts = self.parts.setdefault(phase, {})
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0

    def waited(self, iterable, name: str):
        """Yield from `iterable`, adding the time spent waiting for each item (and for iter() itself:
        a DataLoader starts its workers there) to phase `name`."""
        t0 = time.perf_counter()
        it = iter(iterable)
        while True:
            try:
                item = next(it)
            except StopIteration:
                self.add(name, time.perf_counter() - t0)
                return
            self.add(name, time.perf_counter() - t0)
            yield item
            t0 = time.perf_counter()

    def summary(self) -> dict[str, float]:
        """{phase: seconds}: start-up (when known), the phases, other, total."""
        inside = time.perf_counter() - self.started
        out = {"start-up": self.start_up} if self.start_up is not None else {}
        out.update(self.seconds)
        out["other"] = max(0.0, inside - sum(self.seconds.values()))
        out["total"] = inside + (self.start_up or 0.0)
        return out

    def line(self) -> str:
        parts = [f"{name} {seconds:.2f} s" for name, seconds in self.summary().items()]
        return "time: " + ", ".join(parts)

    def lines(self) -> str:
        """line(), then one line per phase that has parts: `time, model load: weights 5.10 s, ..., rest 0.20 s`
        (rest: the phase's seconds no part covered)."""
        out = [self.line()]
        for phase, parts in self.parts.items():
            rest = max(0.0, self.seconds.get(phase, 0.0) - sum(parts.values()))
            out.append(f"time, {phase}: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds
                                                       in {**parts, "rest": rest}.items()))
        return "\n".join(out)
