"""What every part of the local model server shares: its logger, the default signature and RpcFailure."""
from __future__ import annotations

import logging

import grpc

LOG = logging.getLogger("archive_vision.serving.server")

DEFAULT_SIGNATURE = "serving_default"


class RpcFailure(Exception):
    """A request failure carrying the gRPC status code TF Serving answers with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

