"""Exponential backoff with jitter for the SDK's reconnect loops."""

from __future__ import annotations

import random


class Backoff:
    """`next()` gives the delay before the next attempt: initial, then doubling up to `maximum`,
    each with +-20 % jitter so many clients do not reconnect in step. `reset()` after a success."""

    def __init__(self, initial: float = 0.2, maximum: float = 5.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._delay = initial
        self.attempts = 0

    def next(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * self.factor, self.maximum)
        self.attempts += 1
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._delay = self.initial
        self.attempts = 0
