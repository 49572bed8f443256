"""The serving package's own exceptions, so callers never need to catch grpc.RpcError themselves.

The client raises these `from` the underlying gRPC error; the retryable ones are the failures that
a later attempt of the very same request can get past (a server restarting, a slow call, a queue full).
"""
from __future__ import annotations


class ServingError(Exception):
    """Base class of every error raised by serving/."""


class ExportError(ServingError):
    """A model cannot be exported (wrong outputs, unreadable model file, bad arguments)."""


class InvalidInputError(ServingError):
    """The server rejected the request itself (bad input name, dtype, shape, undecodable image)."""


class ImageTooLargeError(InvalidInputError):
    """A single image is larger than the message limit, so no batching can ever send it."""


class ModelNotFoundError(ServingError):
    """The model, version, label or signature asked for is not served."""


class RetryableServingError(ServingError):
    """A failure that the same request may get past on a later attempt."""


class ServerUnavailableError(RetryableServingError):
    """The server cannot be reached or is not serving yet (gRPC UNAVAILABLE)."""


class DeadlineExceededError(RetryableServingError):
    """A call ran past its deadline (gRPC DEADLINE_EXCEEDED)."""


class ResourceExhaustedError(RetryableServingError):
    """The server is out of a resource, e.g. the message is over its size limit (RESOURCE_EXHAUSTED)."""
