"""Tests for anyserve_tw.worker.model: request bytes to handler arguments and
handler results to response bytes, without copying raw tensors."""
import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos
from anyserve_tw.wire.errors import InferenceError
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
    return SynchronousTestCase().assertRaises(InferenceError, model.serve, payload)


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
