"""The local model server's request and model-call counters, served in Prometheus text format on the REST port."""
from __future__ import annotations

import collections
import threading
from typing import Dict, Tuple


class Metrics:
    """Counters exported in Prometheus text format; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = collections.defaultdict(float)

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add value to the counter `name{labels}`."""
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        with self._lock:
            self._counters[key] += value

    def total(self, name: str) -> float:
        """Sum of a counter over all its labels."""
        with self._lock:
            return sum(v for (n, _), v in self._counters.items() if n == name)

    def prometheus_text(self) -> str:
        """The counters in Prometheus exposition format."""
        with self._lock:
            items = sorted(self._counters.items())
        lines, typed = [], set()
        for (name, labels), value in items:
            if name not in typed:
                lines.append(f"# TYPE {name} counter")
                typed.add(name)
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}")
        return "\n".join(lines) + "\n"

