"""Tests for anyserve_tw.worker.model: request bytes to handler arguments and
handler results to response bytes, without copying raw tensors."""
import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.worker import tensors
from anyserve_tw.worker.model import Model

_v2 = protos.inference


def add_request(a, b, **fields):
    request = _v2.ModelInferRequest(model_name="add", **fields)
    for name, array in (("a", a), ("b", b)):
        request.inputs.add(name=name, datatype="INT32", shape=list(array.shape))
        request.raw_input_contents.append(array.astype("<i4").tobytes())
    return request.SerializeToString()


def add_model():
    return Model(lambda request: {"sum": request["a"] + request["b"]}, "add",
                 inputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])],
                 outputs=[("sum", "INT32", [-1])])


class DecodeTests(SynchronousTestCase):
    def test_raw_inputs_are_views_of_the_frame(self):
        """README: the handler sees a raw tensor through np.frombuffer on the
        frame's bytes, without a copy (and so cannot write to it)."""
        a, b = np.arange(1000, dtype=np.int32), np.ones(1000, dtype=np.int32)
        payload = add_request(a, b, id="r7")
        request = add_model().decode(payload)
        frame = np.frombuffer(payload, dtype=np.uint8)
        for name, expected in (("a", a), ("b", b)):
            array = request[name]
            np.testing.assert_array_equal(array, expected)
            self.assertTrue(np.shares_memory(array, frame), name)
            self.assertFalse(array.flags.writeable)
        self.assertEqual(request.id, "r7")


class EncodeTests(SynchronousTestCase):
    def test_raw_outputs_parse_back(self):
        """Outputs appended as raw bytes behind the serialized response read
        back with protobuf like any other response."""
        model = add_model()
        a = np.arange(5, dtype=np.int32)
        request = model.decode(add_request(a, a, id="x"))
        response = _v2.ModelInferResponse.FromString(
            model.encode(request, model.handler(request)))
        self.assertEqual((response.model_name, response.id), ("add", "x"))
        self.assertEqual([(o.name, o.datatype, list(o.shape)) for o in response.outputs],
                         [("sum", "INT32", [5])])
        np.testing.assert_array_equal(
            np.frombuffer(response.raw_output_contents[0], dtype="<i4"), 2 * a)


    def test_output_tensors_go_out_uncopied(self):
        """The response's parts hold the result arrays' own memory; only the
        frame sender decides whether to copy."""
        total = np.arange(1000, dtype=np.int32)
        model = Model(lambda request: {"sum": total}, "add", outputs=[("sum", "INT32", [-1])])
        parts = model.serve(add_request(total, total))
        self.assertTrue(any(np.shares_memory(np.frombuffer(p, dtype=np.uint8), total)
                            for p in parts if not isinstance(p, bytes)))
        response = _v2.ModelInferResponse.FromString(b"".join(parts))
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<i4"), total)

class PlacementTests(SynchronousTestCase):
    """Where a handler may run follows from how it is declared."""

    def test_declarations(self):
        def plain(request):
            return {}

        async def coroutine(request):
            return {}

        cases = [
            (plain, None, False, True),  # pool, or inline while fast
            (plain, False, False, False),  # pool only
            (plain, True, True, False),  # the loop
            (coroutine, None, True, False),
        ]
        for handler, declared, on_loop, may_run_inline in cases:
            model = Model(handler, "m", asynchronous=declared)
            self.assertEqual((model.asynchronous, model.may_run_inline), (on_loop, may_run_inline),
                             (handler.__name__, declared))


def served(model, payload=None):
    """What Model.serve raises for ``payload`` (an empty request by default)."""
    if payload is None:
        payload = _v2.ModelInferRequest(model_name=model.name).SerializeToString()
    try:
        model.serve(payload)
    except InferenceError as e:
        return e
    raise AssertionError("model %s served %r" % (model.name, payload))


class DeclaredOutputTests(SynchronousTestCase):
    """The handler's outputs are held to their declarations: a cast that
    would change a value, or a shape that is not the declared one, is
    INTERNAL naming the model and the output (FP32 200.0 used to go out as
    INT8 -56)."""

    def test_lossy_cast_is_internal(self):
        model = Model(lambda r: {"y": np.float32([100.0, 200.0])}, "m", outputs=[("y", "INT8", [-1])])
        error = served(model)
        self.assertEqual(error.code, grpc.StatusCode.INTERNAL)
        self.assertEqual(error.message, "model 'm': output 'y' is declared INT8, but the handler "
                                        "returned float32 values it can't hold: 200.0 is out of range")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_exact_cast_goes(self):
        model = Model(lambda r: {"y": np.float32([100.0, -1.0])}, "m", outputs=[("y", "INT8", [-1])])
        response = _v2.ModelInferResponse.FromString(b"".join(model.serve(b"")))
        self.assertEqual(np.frombuffer(response.raw_output_contents[0], "<i1").tolist(), [100, -1])

    def test_declared_dtype_skips_the_cast(self):
        """An array already of the declared dtype costs no conversion."""
        self.patch(tensors, "as_datatype", lambda value, datatype: self.fail("converted"))
        model = Model(lambda r: {"y": np.arange(3, dtype=np.int32)}, "m", outputs=[("y", "INT32", [-1])])
        model.serve(b"")

    def test_shape_not_declared_is_internal(self):
        cases = [
            ([1], np.zeros(2, np.float32), "[2]"),
            ([-1, 3], np.zeros((2, 4), np.float32), "[2, 4]"),
            ([-1], np.float32(1.0), "[]"),
            ([2, -1], np.zeros((2, 1, 1), np.float32), "[2, 1, 1]"),
        ]
        for declared, value, shape in cases:
            model = Model(lambda r, value=value: {"y": value}, "m", outputs=[("y", "FP32", declared)])
            error = served(model)
            self.assertEqual(error.code, grpc.StatusCode.INTERNAL)
            self.assertEqual(error.message, "model 'm' returned output 'y' with shape %s, but it is "
                                            "declared %s" % (shape, declared))

    def test_declared_shapes_accepted(self):
        for declared, shape in (([-1], (0,)), ([-1, 3], (5, 3)), ([2, 2], (2, 2)), ([], ())):
            model = Model(lambda r, shape=shape: {"y": np.zeros(shape, np.float32)}, "m",
                          outputs=[("y", "FP32", declared)])
            response = _v2.ModelInferResponse.FromString(b"".join(model.serve(b"")))
            self.assertEqual(list(response.outputs[0].shape), list(shape))

    def test_undeclared_outputs_go_as_they_are(self):
        model = Model(lambda r: {"y": np.float64([1.5])}, "m")
        response = _v2.ModelInferResponse.FromString(b"".join(model.serve(b"")))
        self.assertEqual(response.outputs[0].datatype, "FP64")


class LongNameTests(SynchronousTestCase):
    """INVALID_ARGUMENT messages quote a client's names shortened: a 4 MB
    input name must not make the status too large to send."""

    NAME = "n" * (4 * 1024 * 1024)

    def assertShortInvalid(self, model, request):
        error = served(model, request.SerializeToString())
        self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertLess(len(error.message), 500)
        self.assertIn("... (4194304 bytes)", error.message)

    def test_unexpected_input(self):
        request = _v2.ModelInferRequest(model_name="add")
        request.inputs.add(name=self.NAME, datatype="INT32", shape=[1]).contents.int_contents.append(1)
        self.assertShortInvalid(add_model(), request)

    def test_input_twice(self):
        request = _v2.ModelInferRequest(model_name="m")
        for _ in range(2):
            request.inputs.add(name=self.NAME, datatype="INT32", shape=[1]).contents.int_contents.append(1)
        self.assertShortInvalid(Model(lambda r: {}, "m"), request)

    def test_unknown_datatype(self):
        request = _v2.ModelInferRequest(model_name="m")
        request.inputs.add(name="a", datatype=self.NAME, shape=[1])
        self.assertShortInvalid(Model(lambda r: {}, "m"), request)

    def test_unknown_output(self):
        a = np.arange(2, dtype=np.int32)
        request = _v2.ModelInferRequest.FromString(add_request(a, a))
        request.outputs.add(name=self.NAME)
        self.assertShortInvalid(add_model(), request)

    def test_shared_memory_parameters(self):
        request = _v2.ModelInferRequest(model_name="m")
        tensor = request.inputs.add(name=self.NAME, datatype="INT32", shape=[1])
        tensor.parameters["shared_memory_offset"].int64_param = 0
        self.assertShortInvalid(Model(lambda r: {}, "m"), request)
        request = _v2.ModelInferRequest(model_name="m")
        output = request.outputs.add(name=self.NAME)
        output.parameters["classification"].int64_param = -1
        self.assertShortInvalid(Model(lambda r: {}, "m"), request)
