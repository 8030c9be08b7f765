"""KServe's own Python clients against a running AnyServe: run under an
interpreter that has ``kserve`` (not the project's venv, whose protobuf and
grpcio-tools kserve would downgrade).

    python kserve_client_calls.py GRPC_HOST:PORT HTTP_HOST:PORT

Prints one JSON object: what each client call returned, or the error it
raised (exception type, gRPC code or HTTP status, message).  A call that
fails is recorded, not fatal, so one run shows everything the clients
disliked; the exit status is non-zero only when the script itself cannot run.
``tests/test_kserve_client.py`` asserts on the output.
"""
import argparse
import asyncio
import json
import sys
import traceback

import grpc
import httpx
import numpy as np

import kserve
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

TIMEOUT = 10.0
A = [1, 2, 3, 4]
B = [10, 20, 30, 40]


def add_request(binary, names=("a", "b"), model="add", request_id=None):
    """``add`` of A and B as KServe's InferRequest: tensors as numpy bytes
    (``binary``: raw contents over gRPC, binary body over REST) or as lists."""
    inputs = []
    for name, values in zip(names, (A, B)):
        tensor = InferInput(name, [len(values)], "INT32")
        if binary:
            tensor.set_data_from_numpy(np.array(values, dtype=np.int32), binary_data=True)
        else:
            tensor.data = list(values)
        inputs.append(tensor)
    return InferRequest(model, inputs, request_id=request_id)


def response_summary(response):
    """A KServe InferResponse as plain JSON, each output decoded by KServe."""
    outputs = []
    for output in response.outputs:
        outputs.append({
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
            "data": output.as_numpy().tolist(),
        })
    return {"model_name": response.model_name, "model_version": response.model_version,
            "id": response.id, "outputs": outputs}


def error_summary(error):
    """What a client raised, as JSON: gRPC code, HTTP status, message."""
    found = {"raised": type(error).__module__ + "." + type(error).__qualname__, "message": str(error)}
    if isinstance(error, grpc.aio.AioRpcError):
        found["code"] = error.code().name
        found["details"] = error.details()
    elif isinstance(error, httpx.HTTPStatusError):
        found["status"] = error.response.status_code
        found["body"] = error.response.text
    return found


async def record(results, key, call, summarize=lambda value: value):
    """Await ``call``; store its (summarized) result or the error it raised."""
    try:
        value = await call
    except Exception as e:  # noqa: BLE001 - every failure is a finding to report
        results[key] = {"error": error_summary(e)}
        if not isinstance(e, (grpc.aio.AioRpcError, httpx.HTTPStatusError)):
            results[key]["error"]["traceback"] = traceback.format_exc()
    else:
        results[key] = {"value": summarize(value)}


async def grpc_calls(address):
    results = {}
    async with InferenceGRPCClient(address, timeout=TIMEOUT) as client:
        await record(results, "is_server_live", client.is_server_live())
        await record(results, "is_server_ready", client.is_server_ready())
        await record(results, "is_model_ready add", client.is_model_ready("add"))
        await record(results, "is_model_ready nope", client.is_model_ready("nope"))
        await record(results, "infer add raw", client.infer(add_request(True, request_id="g1")),
                     response_summary)
        await record(results, "infer add typed", client.infer(add_request(False, request_id="g2")),
                     response_summary)
        await record(results, "infer unknown model", client.infer(add_request(True, model="nope")),
                     response_summary)
        await record(results, "infer wrong input name",
                     client.infer(add_request(True, names=("a", "c"))), response_summary)
        await record(results, "infer add after errors", client.infer(add_request(True)),
                     response_summary)
    # InferenceGRPCClient has no metadata calls: KServe's generated stub does.
    async with grpc.aio.insecure_channel(address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        await record(results, "stub ServerMetadata", stub.ServerMetadata(
            pb.ServerMetadataRequest(), timeout=TIMEOUT),
            lambda m: {"name": m.name, "version": m.version, "extensions": list(m.extensions)})
        await record(results, "stub ModelMetadata add", stub.ModelMetadata(
            pb.ModelMetadataRequest(name="add"), timeout=TIMEOUT), _model_metadata)
    return results


def _model_metadata(m):
    tensors = lambda ts: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}  # noqa: E731
                          for t in ts]
    return {"name": m.name, "versions": list(m.versions), "platform": m.platform,
            "inputs": tensors(m.inputs), "outputs": tensors(m.outputs)}


async def rest_calls(address):
    results = {}
    base = "http://" + address
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=TIMEOUT))

    async def infer(key, request, model="add"):
        headers = {}
        await record(results, key, client.infer(base, request, model_name=model, response_headers=headers),
                     response_summary)
        if "value" in results[key]:  # how the body came: JSON alone, or JSON + binary tensors
            results[key]["value"]["headers"] = {name: headers.get(name) for name in (
                "content-type", "inference-header-content-length")}

    async with client:
        await record(results, "is_server_live", client.is_server_live(base))
        await record(results, "is_server_ready", client.is_server_ready(base))
        await record(results, "is_model_ready add", client.is_model_ready(base, "add"))
        await record(results, "is_model_ready nope", client.is_model_ready(base, "nope"))
        await infer("infer add json", add_request(False, request_id="r1"))
        await infer("infer add binary", add_request(True, request_id="r2"))
        binary_out = add_request(True, request_id="r3")
        binary_out.parameters = {"binary_data_output": True}
        await infer("infer add binary output", binary_out)
        await infer("infer unknown model", add_request(False, model="nope"), model="nope")
        await infer("infer wrong input name", add_request(False, names=("a", "c")))
        await infer("infer add after errors", add_request(False))
    return results


async def main(grpc_address, http_address):
    return {"kserve": getattr(kserve, "__version__", None) or _distribution_version(),
            "grpc": await grpc_calls(grpc_address), "rest": await rest_calls(http_address)}


def _distribution_version():
    from importlib.metadata import version

    return version("kserve")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grpc_address")
    parser.add_argument("http_address")
    args = parser.parse_args()
    json.dump(asyncio.run(main(args.grpc_address, args.http_address)), sys.stdout, indent=1)
    sys.stdout.write("\n")
