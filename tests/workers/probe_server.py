"""A worker for end-to-end tests: models that report on the worker itself.

- ``whoami``: returns this process's pid (output ``pid``, INT64 [1]);
- ``seen``: how many requests have reached this worker, this one included
  (counted when the worker routes them, before any handler or model lookup);
- ``slow``: sleeps ``seconds`` (FP64 [1]) then returns it;
- ``fail``: raises ValueError("boom: <input>");
- ``big``: returns ``n`` (INT64 [1]) zero bytes as UINT8;
- ``relay``: calls ``add`` through the ingress at ``url`` with tritonclient;
- ``nap``: waits ``seconds`` (FP64 [1]) on the worker's loop, holding no
  thread, and counts the waits that were cancelled; ``cancelled`` returns
  that count and how many CANCEL frames the ingress sent.

So that only the ingress can end a request early, this worker gives every
request ten times the time its REQUEST frame allows.
"""
import os
import threading
import time

import numpy as np
import tritonclient.grpc as tritongrpc  # a worker may be a client of other models too

from anyserve_tw import AnyServe
from anyserve_tw.wire import framing
from anyserve_tw.worker.protocol import ModelServer, WorkerProtocol

class CountingApp(AnyServe):
    """Counts every request the worker is asked to route, known model or not."""

    def __init__(self):
        super().__init__()
        self.reached = 0
        self.cancelled = 0
        self.cancel_frames = 0
        self._lock = threading.Lock()

    def route(self, payload):
        with self._lock:
            self.reached += 1
        return super().route(payload)


app = CountingApp()


class ProbeProtocol(WorkerProtocol):
    def frameReceived(self, kind, request_id, aux, payload):
        if kind == framing.CANCEL:
            app.cancel_frames += 1
        elif kind == framing.REQUEST:
            aux = min(aux * 10, 0xFFFFFFFF)
        super().frameReceived(kind, request_id, aux, payload)


ModelServer.protocol = ProbeProtocol


@app.model("whoami", outputs=[("pid", "INT64", [1])])
def whoami(request):
    return np.array([os.getpid()], dtype=np.int64)


@app.model("seen", outputs=[("count", "INT64", [1])])
def seen(request):
    with app._lock:
        return np.array([app.reached], dtype=np.int64)


@app.model("slow", inputs=[("seconds", "FP64", [1])], outputs=[("seconds", "FP64", [1])])
def slow(request):
    seconds = float(request["seconds"][0])
    time.sleep(seconds)
    return np.array([seconds])


@app.model("fail", inputs=[("x", "BYTES", [-1])])
def fail(request):
    raise ValueError("boom: %s" % request["x"][0].decode())


@app.model("reject", inputs=[("x", "INT32", [-1])])
def reject(request):
    """Raises InferenceError the way a hurried author might: numeric code,
    an exception as the message."""
    from anyserve_tw.worker import InferenceError

    raise InferenceError(3, ValueError("x must be positive"))


@app.model("big", inputs=[("n", "INT64", [1])], outputs=[("data", "UINT8", [-1])])
def big(request):
    return np.zeros(int(request["n"][0]), dtype=np.uint8)


@app.model("relay", inputs=[("url", "BYTES", [1]), ("a", "INT32", [-1])])
def relay(request):
    client = tritongrpc.InferenceServerClient(request["url"][0].decode())
    try:
        a = request["a"]
        inputs = [tritongrpc.InferInput(name, list(a.shape), "INT32") for name in ("a", "b")]
        for tensor in inputs:
            tensor.set_data_from_numpy(np.ascontiguousarray(a))
        return {"sum": client.infer("add", inputs).as_numpy("sum")}
    finally:
        client.close()


@app.model("later", inputs=[("x", "INT32", [-1])], asynchronous=True)
def later(request):
    """Returns a Deferred: runs on the worker's event loop."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    x = request["x"]
    return deferLater(reactor, 0.01, lambda: {"x": x * 10, "on_loop": np.array([threading.current_thread() is threading.main_thread()])})


@app.model("inline_add", inputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])], asynchronous=True)
def inline_add(request):
    """Returns its answer directly: runs on the loop, with no thread hop."""
    on_loop = threading.current_thread() is threading.main_thread()
    return {"sum": request["a"] + request["b"], "on_loop": np.array([on_loop])}


@app.model("async_add", inputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])])
async def async_add(request):
    return {"sum": request["a"] + request["b"]}


@app.model("nap", inputs=[("seconds", "FP64", [1])], outputs=[("seconds", "FP64", [1])])
async def nap(request):
    from twisted.internet import reactor
    from twisted.internet.defer import CancelledError
    from twisted.internet.task import deferLater

    seconds = float(request["seconds"][0])
    try:
        await deferLater(reactor, seconds, lambda: None)
    except CancelledError:
        app.cancelled += 1
        raise
    return np.array([seconds])


@app.model("cancelled", outputs=[("count", "INT64", [1]), ("frames", "INT64", [1])])
def cancelled(request):
    return {"count": np.array([app.cancelled], dtype=np.int64),
            "frames": np.array([app.cancel_frames], dtype=np.int64)}


if __name__ == "__main__":
    app.run()
