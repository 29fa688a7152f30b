"""Every error cachegen raises on purpose, and the one table that maps each to a gRPC and an HTTP status."""

from __future__ import annotations


class CacheGenError(Exception):
    """Base of all cachegen errors."""


class FormatError(CacheGenError):
    """A frame or bitstream breaks FORMAT.md: names the field, its byte offset and the value found."""

    def __init__(self, field: str, offset: int, got: object, why: str = "") -> None:
        self.field, self.offset, self.got = field, offset, got
        detail = f": {why}" if why else ""
        super().__init__(f"bad {field} at byte {offset} (got {got!r}){detail}")


class UnsupportedVersion(FormatError):
    """A frame of a format version this build cannot read."""


class LayoutMismatch(CacheGenError):
    """KV of another model, layout or dtype than the one asked for."""


class ChunkNotFound(CacheGenError):
    """No chunk is stored under the key."""


class StoreUnavailable(CacheGenError):
    """The store cannot be reached or failed; callers recompute instead."""


class DeadlineExceeded(CacheGenError):
    """An operation ran past its deadline."""


class InvalidRequest(CacheGenError):
    """A request that cannot be served as given (bad argument, bad credentials are separate)."""


class Unauthenticated(CacheGenError):
    """The call carried no bearer token, or one the service does not know."""


class ModelNotReady(CacheGenError):
    """The model directory is missing or broken; the message names the fix."""


# class -> (gRPC status code name, HTTP status). Looked up along the MRO, so subclasses inherit their parent's row.
STATUS_TABLE: dict[type[CacheGenError], tuple[str, int]] = {
    FormatError: ("DATA_LOSS", 422),
    UnsupportedVersion: ("FAILED_PRECONDITION", 422),
    LayoutMismatch: ("FAILED_PRECONDITION", 409),
    ChunkNotFound: ("NOT_FOUND", 404),
    StoreUnavailable: ("UNAVAILABLE", 503),
    DeadlineExceeded: ("DEADLINE_EXCEEDED", 504),
    InvalidRequest: ("INVALID_ARGUMENT", 400),
    ModelNotReady: ("FAILED_PRECONDITION", 503),
    Unauthenticated: ("UNAUTHENTICATED", 401),
}


def status_for(error: BaseException) -> tuple[str, int]:
    """gRPC status name and HTTP status for any exception; unknown ones are INTERNAL / 500."""
    for cls in type(error).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return ("INTERNAL", 500)
