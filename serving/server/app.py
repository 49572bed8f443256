"""A local server speaking TensorFlow Serving's gRPC API (and its REST API), for one-machine use and tests.

This module: the command line (tensorflow_model_server's flags), ModelServer wiring the parts together, main().
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import sys
import signal
import threading
from http.server import ThreadingHTTPServer
from typing import Optional, Sequence

import grpc

from pipelines.cli import command_parser, configure_logging
from serving import configs
from serving.server.grpc_api import ModelServicer, PredictionServicer
from serving.server.metrics import Metrics
from serving.server.models import ModelManager, model_entries
from serving.server.rest import RestHandler, _metrics_path

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _flag_bool(text: str) -> bool:
    return str(text).lower() in ("1", "true", "yes", "on")


def _add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> argparse.Action:
    """A flag under tensorflow_model_server's name (--model_base_path), with its kebab-case spelling as an alias."""
    kebab = name.replace("_", "-")
    return parser.add_argument(*((name, kebab) if kebab != name else (name,)), **kwargs)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = command_parser("archive-vision serve", __doc__.split("\n")[0],
                            examples=("archive-vision serve --model_name archive_vision --model_base_path models/"
                                      "archive_vision --port 8500 --rest_api_port 8501",
                                      "archive-vision serve --model_config_file models/models.config "
                                      "--enable_batching --batching_parameters_file models/batching_parameters.txt"))
    bool_flag = {"nargs": "?", "const": True, "type": _flag_bool}
    flag = functools.partial(_add_flag, parser)
    flag("--port", type=int, default=8500, help="gRPC port (0: any free port)")
    flag("--rest_api_port", type=int, default=0, help="REST/metrics port (0: no REST server)")
    flag("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1 only)")
    flag("--model_name", default="default", help="name of the single model (with --model_base_path)")
    flag("--model_base_path", help="dir holding numeric version dirs of the single model")
    flag("--model_config_file", help="models.config (ModelServerConfig text proto)")
    flag("--file_system_poll_wait_seconds", type=float, default=1.0,
         help="seconds between checks for new versions (0: load once)")
    flag("--enable_batching", default=False, **bool_flag)
    flag("--batching_parameters_file", help="batching_parameters.txt (BatchingParameters text proto)")
    flag("--enable_model_warmup", default=True, **bool_flag,
         help="replay assets.extra/tf_serving_warmup_requests before serving a version")
    flag("--monitoring_config_file", help="monitoring.config; its Prometheus path is served on REST")
    flag("--max_message_bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
         help="largest gRPC request/response; larger ones get RESOURCE_EXHAUSTED")
    flag("--grpc_max_threads", type=int, default=32)
    flag("--tensorflow_intra_op_parallelism", type=int, default=0)
    flag("--tensorflow_inter_op_parallelism", type=int, default=0)
    flag("--ssl_cert_file", help="PEM server certificate chain: serve gRPC over TLS")
    flag("--ssl_key_file", help="PEM private key of --ssl_cert_file")
    flag("--ssl_client_ca_file", help="PEM CA bundle: require client certificates signed by it")
    args = parser.parse_args(argv)
    if not args.model_config_file and not args.model_base_path:
        parser.error("pass --model_base_path (with --model_name) or --model_config_file")
    if bool(args.ssl_cert_file) != bool(args.ssl_key_file):
        parser.error("--ssl_cert_file and --ssl_key_file go together")
    return args


class ModelServer:
    """The running server: model manager, gRPC server (+ health), optional REST server."""

    def __init__(self, args: argparse.Namespace):
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.args = args
        self.metrics = Metrics()
        batching = None
        if args.enable_batching:
            batching = configs.BatchingParameters()
            if args.batching_parameters_file:
                with open(args.batching_parameters_file, encoding="utf-8") as f:
                    batching = configs.parse_batching_parameters(f.read())
        self.manager = ModelManager(model_entries(args), self.metrics, batching, warmup=args.enable_model_warmup)
        self._health = health.HealthServicer()
        self._health_pb2 = health_pb2
        self.manager.on_change = self._update_health
        options = [("grpc.max_receive_message_length", args.max_message_bytes),
                   ("grpc.max_send_message_length", args.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.grpc_server = grpc.server(concurrent.futures.ThreadPoolExecutor(args.grpc_max_threads), options=options)
        self.predictions = PredictionServicer(self.manager, self.metrics)
        self.models = ModelServicer(self.manager, self.metrics)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self.predictions, self.grpc_server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self.models, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.grpc_server)
        address = f"{args.host}:{args.port}"
        if args.ssl_cert_file:
            credentials = grpc.ssl_server_credentials(
                [(_read_bytes(args.ssl_key_file), _read_bytes(args.ssl_cert_file))],
                root_certificates=_read_bytes(args.ssl_client_ca_file) if args.ssl_client_ca_file else None,
                require_client_auth=bool(args.ssl_client_ca_file))
            self.port = self.grpc_server.add_secure_port(address, credentials)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        self.rest_server: Optional[ThreadingHTTPServer] = None
        if args.rest_api_port:
            handler = type("BoundRestHandler", (RestHandler,), {
                "predictions": self.predictions, "models": self.models, "metrics": self.metrics,
                "metrics_path": _metrics_path(args.monitoring_config_file)})
            self.rest_server = ThreadingHTTPServer((args.host, args.rest_api_port), handler)
            self.rest_server.daemon_threads = True

    def _update_health(self) -> None:
        serving = self._health_pb2.HealthCheckResponse.SERVING
        not_serving = self._health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.manager.model_names():
            self._health.set(name, serving if self.manager.has_available(name) else not_serving)
        everything = serving if self.manager.has_available() else not_serving
        for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
            self._health.set(service, everything)

    def start(self) -> None:
        """Start answering (NOT_SERVING health until models load), load models, start polling."""
        self._update_health()
        self.grpc_server.start()
        if self.rest_server:
            threading.Thread(target=self.rest_server.serve_forever, name="rest", daemon=True).start()
        self.manager.start(self.args.file_system_poll_wait_seconds)
        rest = f" REST on {self.args.host}:{self.rest_server.server_address[1]}" if self.rest_server else ""
        print(f"archive-vision serve: gRPC on {self.args.host}:{self.port}{rest}; models "
              f"{', '.join(self.manager.model_names())}", flush=True)

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, finish in-flight ones (bounded by grace), unload models."""
        self._health.enter_graceful_shutdown()
        if self.rest_server:
            self.rest_server.shutdown()
        self.grpc_server.stop(grace).wait(grace + 1)
        self.manager.stop()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`archive-vision serve`: serve models over TF Serving's gRPC API until SIGINT/SIGTERM."""
    args = _parse_args(argv)
    configure_logging(argv if argv is not None else sys.argv[1:])
    import tensorflow as tf

    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)
    server = ModelServer(args)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    while not stopping.wait(1.0):
        pass
    server.stop()
    return 0
