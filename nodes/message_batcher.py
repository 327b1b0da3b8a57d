"""Rate-bounded batching of a node's live-view messages (pure Python: the sending is the caller's)."""
from __future__ import annotations

import math
from typing import Callable

MIN_INTERVAL = 0.1  # seconds between two messages of one node: at most 10 a second
TERMINAL_PHASES = ("done", "cancelled", "failed")


class MessageBatcher:
    """Rate-bounds one node's messages. Runs on the server's event loop (so it needs no lock): a message that comes
    sooner than `interval` after the previous one is held, merged with any that follow (their loss points appended,
    the rest replaced by the newest) and sent when the interval is up, so the newest state is never held back for
    longer than that. Terminal messages ("done", "cancelled", "failed") are sent at once, with what was held."""

    def __init__(self, send: Callable[[dict], None], clock: Callable[[], float],
                 call_later: Callable[[float, Callable[[], None]], object], interval: float = MIN_INTERVAL):
        self.send, self.clock, self.call_later, self.interval = send, clock, call_later, interval
        self.held: dict | None = None
        self.last_sent = -math.inf
        self.timer = None

    def post(self, message: dict) -> None:
        if self.held is not None:
            message = {**message, "points": self.held["points"] + message["points"]}
        self.held = message
        wait = self.last_sent + self.interval - self.clock()
        if message["phase"] in TERMINAL_PHASES or wait <= 0:
            self.flush()
        elif self.timer is None:
            self.timer = self.call_later(wait, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held is not None:
            self.send(self.held)
            self.held = None
            self.last_sent = self.clock()
