"""LM workers' load reports (``mdl:lm:workers``): workers write them, gateways read them to decide
whether a new stream can be captioned."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadReport:
    """One LM worker's load."""

    sessions: int  # live sessions it holds
    capacity: int  # the most it takes (WorkerLimits.max_sessions)
    behind: bool  # its publications wait longer than its max_lag_seconds
    at: float  # unix seconds of the report

    def to_text(self) -> str:
        return f"{self.sessions} {self.capacity} {int(self.behind)} {self.at:.3f}"

    @classmethod
    def from_text(cls, text: str) -> LoadReport:
        sessions, capacity, behind, at = text.split()
        return cls(int(sessions), int(capacity), behind == "1", float(at))

    @property
    def free(self) -> int:
        """Sessions it can still take (none while it is behind)."""
        return 0 if self.behind else max(0, self.capacity - self.sessions)
