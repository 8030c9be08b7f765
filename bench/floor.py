"""The bench's floor: the ingress's gRPC front with the model inline.

``python bench/bench.py --floor`` starts this beside the ingress.  It is
a grpcio thread-pool server made by the ingress's own ``build_server`` with
the ingress's defaults and malloc settings, but ModelInfer computes ``add``
right in the gRPC thread: no reactor bridge, no worker, no second process.  Whatever
design sits behind a thread-pool grpcio front, it cannot beat this, so the
floor's req/s is the ceiling of the thread front (``--front threads``) on the
machine at hand; the asyncio front is not bound by it.

Usage: python bench/floor.py PORT
"""
import signal
import sys
import threading

import grpc
import numpy as np

from anyserve_tw.wire import defaults, protos
from anyserve_tw.allocator import keep_freed_memory
from anyserve_tw.ingress.threadfront import build_server

_v2 = protos.inference
_INT32 = np.dtype("<i4")  # v2 raw contents are little-endian


def model_infer(request_bytes, context):
    """``sum = a + b`` on raw INT32 inputs, answered as raw output."""
    request = _v2.ModelInferRequest.FromString(request_bytes)
    if len(request.raw_input_contents) != 2:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "add wants raw inputs a and b")
    a, b = (np.frombuffer(raw, dtype=_INT32) for raw in request.raw_input_contents)
    total = a + b
    response = _v2.ModelInferResponse(model_name=request.model_name, id=request.id)
    response.outputs.add(name="sum", datatype="INT32", shape=[total.size])
    response.raw_output_contents.append(total.tobytes())
    return response.SerializeToString()


def model_ready(request, context):
    return _v2.ModelReadyResponse(ready=request.name == "add")


def serve(port):
    keep_freed_memory()  # as the ingress does
    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
        "ModelReady": grpc.unary_unary_rpc_method_handler(
            model_ready, request_deserializer=_v2.ModelReadyRequest.FromString,
            response_serializer=_v2.ModelReadyResponse.SerializeToString),
    }
    server = build_server(
        [grpc.method_handlers_generic_handler(protos.INFERENCE_SERVICE, handlers)],
        max_message_size=defaults.MAX_MESSAGE_SIZE, label="floor")
    if not server.add_insecure_port("127.0.0.1:%d" % port):
        raise SystemExit("cannot listen on port %d" % port)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.stop(1.0).wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
