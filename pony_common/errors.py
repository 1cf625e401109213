"""Domain exceptions. Model and servicer code raise these; one gRPC interceptor maps them to status codes."""

from __future__ import annotations


class PonyError(Exception):
    """Base of the errors the platform raises on purpose; the message is safe to show a caller."""


class InvalidArgument(PonyError):
    """Bad input. `field` names the request field at fault (e.g. `items[2].image`)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class NotFound(PonyError):
    """The named thing does not exist."""


class AlreadyExists(PonyError):
    """The thing to create is there already."""


class FailedPrecondition(PonyError):
    """The system is not in a state where the call can run (e.g. no cluster set fitted yet)."""


class Overloaded(PonyError):
    """Too much work in flight; the caller should back off (RESOURCE_EXHAUSTED)."""


class DependencyUnavailable(PonyError):
    """A service or store this call needs is down (UNAVAILABLE); retrying later may work."""


class Cancelled(PonyError):
    """The work was cancelled before it finished."""
