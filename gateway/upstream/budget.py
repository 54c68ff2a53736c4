"""A retry budget: retries may add at most ``ratio`` on top of the requests (Finagle's, simplified).

Every request to the upstream deposits ``ratio`` of a token; every retry spends a whole
one, and is not made when there is none. So with an upstream failing every request, it
sees at most (1 + ratio) times the requests the clients sent, never a retry storm. The
balance is capped, so a long calm spell does not bank a storm either. A try that never
reached its target (connection refused, name not resolved) is retried without spending from
the budget: it added nothing to anyone's load. A connect timeout does spend: it is what an
overloaded target (its accept queue full) looks like.
"""

from __future__ import annotations

CAP = 10.0


class RetryBudget:
    __slots__ = ("ratio", "tokens")

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.tokens = 0.0

    def deposit(self) -> None:
        self.tokens = min(CAP, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
