"""Example worker with a decoupled (streaming) model: ``countdown``.

Given INT32 ``n`` (shape [1]) it sends ``n`` responses whose INT32 ``value``
counts n-1 down to 0, each as soon as it is produced, the way a language
model streams tokens.  A handler that yields is served through
ModelStreamInfer (tritonclient's ``start_stream`` / ``async_stream_infer``).

Run it under the ingress (``twistd -n anyserve --worker examples/stream_server.py``)
or on its own next to a running ingress (``python examples/stream_server.py``).
"""
import numpy as np

from anyserve_tw import AnyServe

app = AnyServe()

#: Most responses one request may ask for.
MAX_COUNT = 10000


@app.model("countdown", inputs=[("n", "INT32", [1])], outputs=[("value", "INT32", [1])])
def countdown(request):
    n = int(request["n"][0])
    if not 0 <= n <= MAX_COUNT:
        from anyserve_tw import InferenceError
        import grpc

        raise InferenceError(grpc.StatusCode.INVALID_ARGUMENT, "n must be in 0..%d, got %d" % (MAX_COUNT, n))
    for value in range(n - 1, -1, -1):
        yield {"value": np.array([value], dtype=np.int32)}


if __name__ == "__main__":
    app.run()
