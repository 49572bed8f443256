"""`python -m archive_vision`: the same exit as the console script (archive_vision.cli.entry: no interpreter teardown
under the native threads gRPC and TensorFlow leave, which can abort a finished run with SIGABRT)."""
from archive_vision.cli import entry

entry()
