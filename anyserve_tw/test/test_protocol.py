"""Tests for anyserve_tw.wire.protos (our messages match KServe v2 / tritonclient)
and anyserve_tw.wire.rpc (method tables built from the descriptor pool)."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf import descriptor_pool
from tritonclient.grpc import service_pb2 as triton

from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos, rpc

TRITON_POOL = triton.DESCRIPTOR.pool


def label_of(field):
    """LABEL_* of a field (protobuf 7 dropped FieldDescriptor.label)."""
    label = getattr(field, "label", None)
    if label is not None:
        return label
    if field.is_repeated:
        return field.LABEL_REPEATED
    if field.is_required:
        return field.LABEL_REQUIRED
    return field.LABEL_OPTIONAL


def field_signature(field):
    """What must agree for two fields to be the same on the wire and in code."""
    return {
        "name": field.name,
        "number": field.number,
        "type": field.type,
        "label": label_of(field),
        "message_type": field.message_type.full_name if field.message_type else None,
        "enum_type": field.enum_type.full_name if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
        "packed": field.is_packed,
    }


def all_messages(descriptors):
    """Every message descriptor in ``descriptors``, nested types included."""
    for descriptor in descriptors:
        yield descriptor
        for nested in all_messages(descriptor.nested_types):
            yield nested


def our_inference_messages():
    top = protos.POOL.FindFileByName("anyserve/inference.proto").message_types_by_name.values()
    return list(all_messages(top))


#: The protocol's own messages: these must match Triton's completely.
KSERVE_V2_MESSAGES = {
    "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
    "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
    "ModelMetadataRequest", "ModelMetadataResponse", "InferParameter", "InferTensorContents",
    "ModelInferRequest", "ModelInferResponse", "ModelStreamInferResponse",
}


class MessageCompatibilityTests(SynchronousTestCase):
    """Our ``inference`` package matches tritonclient's field for field."""

    def test_package(self):
        """Our inference messages live in package ``inference``, like Triton's."""
        file = protos.POOL.FindFileByName("anyserve/inference.proto")
        self.assertEqual(file.package, "inference")
        self.assertEqual(triton.DESCRIPTOR.package, "inference")

    def test_enough_messages_compared(self):
        """The comparison below covers the KServe v2 messages, nested ones too."""
        names = {d.full_name for d in our_inference_messages()}
        for expected in (
            "inference.ModelInferRequest",
            "inference.ModelInferRequest.InferInputTensor",
            "inference.ModelInferRequest.InferRequestedOutputTensor",
            "inference.ModelInferRequest.ParametersEntry",
            "inference.ModelInferResponse.InferOutputTensor",
            "inference.ModelMetadataResponse.TensorMetadata",
            "inference.InferParameter",
            "inference.InferTensorContents",
        ):
            self.assertIn(expected, names)

    def test_every_message_matches_tritonclient(self):
        """Same fields (name, number, type, label, message type) as
        tritonclient: all of them for the KServe v2 messages; for Triton's
        extensions (model configuration, statistics, ...) the fields we
        define, each as Triton defines it."""
        for ours in our_inference_messages():
            theirs = TRITON_POOL.FindMessageTypeByName(ours.full_name)
            if ours.full_name.split(".")[1] in KSERVE_V2_MESSAGES:
                self.assertEqual(
                    sorted(ours.fields_by_name), sorted(theirs.fields_by_name), ours.full_name
                )
            else:
                self.assertLessEqual(set(ours.fields_by_name), set(theirs.fields_by_name), ours.full_name)
            for field in ours.fields:
                self.assertEqual(
                    field_signature(field),
                    field_signature(theirs.fields_by_name[field.name]),
                    "%s.%s" % (ours.full_name, field.name),
                )
            self.assertEqual(
                ours.GetOptions().map_entry, theirs.GetOptions().map_entry, ours.full_name
            )
            self.assertLessEqual(
                {o.name for o in ours.oneofs}, {o.name for o in theirs.oneofs}, ours.full_name,
            )

    def test_namespace_has_every_top_level_message(self):
        """protos.inference exposes a class for each top-level message."""
        file = protos.POOL.FindFileByName("anyserve/inference.proto")
        for name in file.message_types_by_name:
            cls = getattr(protos.inference, name)
            self.assertEqual(cls.DESCRIPTOR.full_name, "inference." + name)

    def test_bytes_cross_both_ways(self):
        """A full request serialized by one set of classes parses in the other."""
        ours = protos.inference.ModelInferRequest(model_name="m", model_version="2", id="i")
        ours.parameters["p"].uint64_param = 2**63
        tensor = ours.inputs.add(name="x", datatype="INT32", shape=[2, 2])
        tensor.contents.int_contents.extend([1, -2, 3, -4])
        ours.outputs.add(name="y").parameters["binary_data"].bool_param = True
        ours.raw_input_contents.append(b"\x00\x01")
        theirs = triton.ModelInferRequest.FromString(ours.SerializeToString())
        self.assertEqual(theirs.model_name, "m")
        self.assertEqual(theirs.parameters["p"].uint64_param, 2**63)
        self.assertEqual(list(theirs.inputs[0].contents.int_contents), [1, -2, 3, -4])
        self.assertEqual(list(theirs.inputs[0].shape), [2, 2])
        self.assertTrue(theirs.outputs[0].parameters["binary_data"].bool_param)
        self.assertEqual(theirs.raw_input_contents[0], b"\x00\x01")
        back = protos.inference.ModelInferRequest.FromString(theirs.SerializeToString())
        self.assertEqual(back, ours)

    def test_private_pool(self):
        """Our classes come from a private pool, distinct from tritonclient's."""
        self.assertIsNot(protos.POOL, descriptor_pool.Default())
        self.assertIsNot(protos.inference.ModelInferRequest, triton.ModelInferRequest)
        self.assertIs(
            descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest"),
            triton.ModelInferRequest.DESCRIPTOR,
        )

    def test_both_importable_in_either_order(self):
        """No "duplicate symbol": tritonclient and our protos load together."""
        for first, second in (
            ("tritonclient.grpc.service_pb2", "anyserve_tw.wire.protos"),
            ("anyserve_tw.wire.protos", "tritonclient.grpc"),
        ):
            code = (
                "import importlib; importlib.import_module(%r); importlib.import_module(%r);"
                "from anyserve_tw.wire import protos, rpc;"
                "from tritonclient.grpc import service_pb2;"
                "print(protos.inference.ModelInferRequest(model_name='x').SerializeToString()"
                " == service_pb2.ModelInferRequest(model_name='x').SerializeToString())"
                % (first, second)
            )
            result = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stdout.strip(), "True", (first, second))


class ServiceCompatibilityTests(SynchronousTestCase):
    """Our inference.GRPCInferenceService methods exist in tritonclient's."""

    def test_service_methods(self):
        """Each method: same name, same input and output message full names."""
        ours = protos.service_descriptor(protos.INFERENCE_SERVICE)
        theirs = TRITON_POOL.FindServiceByName("inference.GRPCInferenceService")
        self.assertEqual(ours.full_name, "inference.GRPCInferenceService")
        self.assertEqual({m.name for m in ours.methods}, set(theirs.methods_by_name))
        for method in ours.methods:
            other = theirs.methods_by_name[method.name]
            self.assertEqual(method.input_type.full_name, other.input_type.full_name, method.name)
            self.assertEqual(method.output_type.full_name, other.output_type.full_name, method.name)
            self.assertEqual(
                (method.client_streaming, method.server_streaming),
                (other.client_streaming, other.server_streaming),
                method.name,
            )

    def test_management_service(self):
        """The management service is found by name with its three methods."""
        service = protos.service_descriptor(protos.MANAGEMENT_SERVICE)
        self.assertEqual(
            {m.name: (m.input_type.name, m.output_type.name) for m in service.methods},
            {
                "RegisterModel": ("RegisterModelRequest", "RegisterModelResponse"),
                "UnregisterModel": ("UnregisterModelRequest", "UnregisterModelResponse"),
                "Heartbeat": ("HeartbeatRequest", "HeartbeatResponse"),
            },
        )


class RecordingManagement:
    """A trivial management servicer recording what it received."""

    def __init__(self):
        self.received = []

    def RegisterModel(self, request, context):
        self.received.append(request)
        return protos.management.RegisterModelResponse(
            success=True,
            message="%s:%s from %s (%d inputs)"
            % (request.model_name, request.model_version, request.worker_id, len(request.inputs)),
        )

    def UnregisterModel(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no %s here" % request.model_name)

    def Heartbeat(self, request, context):
        return protos.management.HeartbeatResponse(healthy=request.worker_id == "known")


class RawInference:
    """Inference servicer: ModelInfer raw (bytes), the rest parsed."""

    def __init__(self):
        self.raw_seen = []

    def ModelInfer(self, request, context):
        self.raw_seen.append(request)
        response = protos.inference.ModelInferResponse(model_name="echo", id="raw")
        response.raw_output_contents.append(request)
        return response.SerializeToString()

    def ServerLive(self, request, context):
        return protos.inference.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return protos.inference.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return protos.inference.ModelReadyResponse(ready=request.name == "ready")

    def ServerMetadata(self, request, context):
        return protos.inference.ServerMetadataResponse(name="anyserve")

    def ModelMetadata(self, request, context):
        return protos.inference.ModelMetadataResponse(name=request.name)


class RpcTests(SynchronousTestCase):
    """rpc.generic_handler and rpc.Stub against a real gRPC server."""

    def serve(self, service_name, servicer, raw_methods=()):
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers(
            (rpc.generic_handler(service_name, servicer, raw_methods),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        self.assertNotEqual(port, 0)
        server.start()
        self.addCleanup(lambda: server.stop(None).wait(10))
        channel = grpc.insecure_channel("127.0.0.1:%d" % port)
        self.addCleanup(channel.close)
        return channel

    def test_register_model_round_trip(self):
        """RegisterModel through Stub and generic_handler: request and response intact."""
        servicer = RecordingManagement()
        channel = self.serve(protos.MANAGEMENT_SERVICE, servicer)
        stub = rpc.Stub(channel, protos.MANAGEMENT_SERVICE)
        request = protos.management.RegisterModelRequest(
            model_name="resnet", model_version="2", worker_address="unix:///tmp/w.sock",
            worker_id="w-1", platform="python",
        )
        request.inputs.add(name="x", datatype="FP32", shape=[-1, 3])
        request.outputs.add(name="y", datatype="INT64", shape=[-1])
        response = stub.RegisterModel(request, timeout=30)
        self.assertIsInstance(response, protos.management.RegisterModelResponse)
        self.assertTrue(response.success)
        self.assertEqual(response.message, "resnet:2 from w-1 (1 inputs)")
        self.assertEqual(len(servicer.received), 1)
        self.assertEqual(servicer.received[0], request)
        self.assertEqual(list(servicer.received[0].inputs[0].shape), [-1, 3])

    def test_other_management_methods(self):
        """Heartbeat answers; an aborting servicer's status reaches the client."""
        channel = self.serve(protos.MANAGEMENT_SERVICE, RecordingManagement())
        stub = rpc.Stub(channel, protos.MANAGEMENT_SERVICE)
        self.assertTrue(stub.Heartbeat(protos.management.HeartbeatRequest(worker_id="known"), timeout=30).healthy)
        self.assertFalse(stub.Heartbeat(protos.management.HeartbeatRequest(worker_id="x"), timeout=30).healthy)
        error = self.assertRaises(
            grpc.RpcError, stub.UnregisterModel,
            protos.management.UnregisterModelRequest(model_name="gone"), timeout=30,
        )
        self.assertEqual(error.code(), grpc.StatusCode.NOT_FOUND)
        self.assertEqual(error.details(), "no gone here")

    def test_stub_methods(self):
        """A Stub has one callable per method of the service."""
        channel = grpc.insecure_channel("127.0.0.1:1")
        self.addCleanup(channel.close)
        stub = rpc.Stub(channel, protos.INFERENCE_SERVICE)
        for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                     "ModelMetadata", "ModelInfer"):
            self.assertTrue(callable(getattr(stub, name)), name)

    def test_raw_method_gets_bytes(self):
        """A raw method receives the client's bytes untouched; others are parsed."""
        servicer = RawInference()
        channel = self.serve(protos.INFERENCE_SERVICE, servicer, raw_methods=("ModelInfer",))
        request = triton.ModelInferRequest(model_name="echo", id="abc")
        request.raw_input_contents.append(b"\xff" * 1000)
        sent = request.SerializeToString()
        # A tritonclient-typed stub on the same path talks to our server.
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=triton.ModelInferRequest.SerializeToString,
            response_deserializer=triton.ModelInferResponse.FromString,
        )
        response = infer(request, timeout=30)
        self.assertEqual(servicer.raw_seen, [sent])
        self.assertIsInstance(servicer.raw_seen[0], bytes)
        self.assertEqual(response.raw_output_contents[0], sent)
        stub = rpc.Stub(channel, protos.INFERENCE_SERVICE)
        self.assertTrue(stub.ServerLive(protos.inference.ServerLiveRequest(), timeout=30).live)
        self.assertTrue(stub.ModelReady(protos.inference.ModelReadyRequest(name="ready"), timeout=30).ready)
        self.assertEqual(
            stub.ModelMetadata(protos.inference.ModelMetadataRequest(name="mm"), timeout=30).name, "mm"
        )
