"""The worker app the fuzz tests feed: one model of each kind a handler can
be, so that mutated requests reach every decode and answer path.  Used in
process (anyserve_tw/test/test_fuzz_frames.py) and as a real worker
(tests/workers/fuzz_server.py).

- ``add``: declared INT32 ``a`` + ``b`` -> ``sum`` (validated specs, thread pool);
- ``echo``: no specs, returns every input as it was decoded (any datatype);
- ``now``: on the event loop, answers how many inputs it got;
- ``count``: decoupled (a generator), three responses per request.
"""
import grpc

from anyserve_tw.wire.errors import InferenceError


def fuzz_app():
    """Models of each kind a handler can be: plain (pool or inline), on the
    loop, decoupled; with and without declared specs."""
    from anyserve_tw.worker.app import AnyServe

    app = AnyServe()

    @app.model("add", inputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])],
               outputs=[("sum", "INT32", [-1])])
    def add(request):
        a, b = request["a"], request["b"]
        if a.shape != b.shape:
            raise InferenceError(grpc.StatusCode.INVALID_ARGUMENT, "a and b differ in shape")
        return {"sum": a + b}

    @app.model("echo")
    def echo(request):
        return {name: tensor.as_numpy() for name, tensor in request.inputs.items()}

    @app.model("now", asynchronous=True)
    def now(request):
        return {"n": [len(request.inputs)]}

    @app.model("count")
    def count(request):
        for i in range(3):
            yield {"n": [i]}

    return app
