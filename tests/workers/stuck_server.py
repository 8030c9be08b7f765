"""A worker for the stuck-thread tests: handlers that hold their thread.

- ``slow``: sleeps ``seconds`` (FP64 [1]) in a pool thread, then returns it;
- ``add``: ``a + b`` (INT32), always in a pool thread (never inline), so it
  needs a thread to answer;
- ``fail``: raises ValueError naming its input, in a pool thread;
- ``health``: on the loop (no thread needed), the worker's
  ``Execution.healthy()`` (BOOL [1]), its reason (BYTES [1]), and how many
  threads are stuck (INT64 [1]) and hold a handler (INT64 [1]).

Deadlines reach this worker unchanged (unlike the probe worker's).
"""
import time

import numpy as np

from anyserve_tw import AnyServe
from anyserve_tw.worker.protocol import ModelServer, WorkerProtocol

app = AnyServe()
executions = []


class Protocol(WorkerProtocol):
    """Keeps the Execution it serves, for ``health``."""

    def __init__(self, execution, connections=None):
        super().__init__(execution, connections)
        if not executions:
            executions.append(execution)


ModelServer.protocol = Protocol


@app.model("slow", inputs=[("seconds", "FP64", [1])], outputs=[("seconds", "FP64", [1])],
           asynchronous=False)
def slow(request):
    seconds = float(request["seconds"][0])
    time.sleep(seconds)
    return np.array([seconds])


@app.model("add", inputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])], outputs=[("sum", "INT32", [-1])],
           asynchronous=False)
def add(request):
    return request["a"] + request["b"]


@app.model("fail", inputs=[("x", "INT32", [1])], asynchronous=False)
def fail(request):
    raise ValueError("stuck_server fail %d" % int(request["x"][0]))


@app.model("health", outputs=[("healthy", "BOOL", [1]), ("reason", "BYTES", [1]),
                              ("stuck", "INT64", [1]), ("occupied", "INT64", [1])], asynchronous=True)
def health(request):
    execution = executions[0]
    return {"healthy": np.array([execution.healthy()]),
            "reason": np.array([execution.reason().encode()], dtype=object),
            "stuck": np.array([execution.threads.stuck], dtype=np.int64),
            "occupied": np.array([execution.threads.occupied], dtype=np.int64)}


if __name__ == "__main__":
    app.run()
