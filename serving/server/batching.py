"""--enable_batching: merges concurrent requests for one signature into model calls (as TF Serving's batcher)."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Callable, Dict, List, Optional

import grpc
import numpy as np

from serving import configs
from serving.server.common import RpcFailure


@dataclasses.dataclass
class _Task:
    inputs: Dict[str, np.ndarray]
    rows: int
    future: concurrent.futures.Future


class RequestBatcher:
    """Merges concurrent requests of one signature into model calls of up to max_batch_size rows."""

    def __init__(self, run: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]],
                 params: configs.BatchingParameters, name: str):
        self._run = run
        self._params = params
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        # One thread gathers a batch at a time; the others run model calls meanwhile.
        self._gather_lock = threading.Lock()
        self._stopped = False
        self._threads = [threading.Thread(target=self._loop, name=f"batch-{name}-{i}", daemon=True)
                         for i in range(max(1, params.num_batch_threads))]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Dict[str, np.ndarray], rows: int) -> concurrent.futures.Future:
        """Queue one request; its future resolves to that request's own rows of the outputs."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if rows == 0 or rows >= self._params.max_batch_size:
            self._execute([_Task(inputs, rows, future)])
            return future
        with self._cond:
            if self._stopped:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "the model version is being unloaded")
            if len(self._queue) >= self._params.max_enqueued_batches * self._params.max_batch_size:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE,
                                 "The batch scheduling queue to which this task was submitted is full")
            self._queue.append(_Task(inputs, rows, future))
            self._cond.notify_all()
        return future

    def stop(self) -> None:
        """Finish the queued requests, then end the batch threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _gather(self) -> Optional[List[_Task]]:
        with self._gather_lock, self._cond:
            while not self._queue:
                if self._stopped:
                    return None
                self._cond.wait(0.5)
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            deadline = time.monotonic() + self._params.batch_timeout_micros / 1e6
            while rows < self._params.max_batch_size:
                if self._queue:
                    if rows + self._queue[0].rows > self._params.max_batch_size:
                        break
                    task = self._queue.popleft()
                    batch.append(task)
                    rows += task.rows
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped:
                    break
                self._cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch: List[_Task]) -> None:
        try:
            if len(batch) == 1:
                batch[0].future.set_result(self._run(batch[0].inputs))
                return
            merged = {k: np.concatenate([t.inputs[k] for t in batch], axis=0) for k in batch[0].inputs}
            outputs = self._run(merged)
        except RpcFailure as failure:
            if len(batch) == 1 or failure.code != grpc.StatusCode.INVALID_ARGUMENT:
                for task in batch:
                    task.future.set_exception(failure)
                return
            # One request's data broke the merged call: answer each alone so only that one fails.
            for task in batch:
                self._execute([task])
            return
        except Exception as error:  # noqa: BLE001 - every waiting request must get an answer
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(error)
            return
        start = 0
        for task in batch:
            task.future.set_result({k: v[start:start + task.rows] for k, v in outputs.items()})
            start += task.rows
