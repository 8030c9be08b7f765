"""Example worker: ``add`` (a + b) and ``echo`` (returns its input).

Run it under the ingress (``twistd -n anyserve --worker examples/kserve_server.py``)
or on its own next to a running ingress (``python examples/kserve_server.py``).
"""
from anyserve_tw import AnyServe

app = AnyServe()


@app.model(
    "add",
    inputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])],
    outputs=[("sum", "INT32", [-1])],
)
def add(request):
    a, b = request["a"], request["b"]
    if a.shape != b.shape:
        from anyserve_tw.worker import InferenceError
        import grpc

        raise InferenceError(grpc.StatusCode.INVALID_ARGUMENT, "a and b must have the same shape")
    return {"sum": a + b}


@app.model("echo")
def echo(request):
    """Returns every input unchanged, under the same name."""
    return {name: tensor.as_numpy() for name, tensor in request.inputs.items()}


if __name__ == "__main__":
    app.run()
