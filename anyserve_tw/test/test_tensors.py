"""Tests for anyserve_tw.worker.tensors, the worker's Model.decode/encode and
AnyServe.route/handle: request bytes in, handler arguments, response bytes out."""
import grpc
import numpy as np
import tritonclient.grpc as tritongrpc
from tritonclient.grpc import _utils as tritonutils
from tritonclient.grpc import service_pb2 as triton

from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos
from anyserve_tw.worker import tensors
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.worker.app import AnyServe
from anyserve_tw.worker.model import InferResponse, Model, TensorSpec

_v2 = protos.inference

#: Per datatype: values exercising its range, exactly representable.
VALUES = {
    "BOOL": [True, False, True],
    "INT8": [-128, 0, 127],
    "INT16": [-32768, 1, 32767],
    "INT32": [-(2**31), 0, 2**31 - 1],
    "INT64": [-(2**63), 0, 2**63 - 1],
    "UINT8": [0, 1, 255],
    "UINT16": [0, 1, 65535],
    "UINT32": [0, 1, 2**32 - 1],
    "UINT64": [0, 1, 2**64 - 1],
    "FP16": [0.5, -2.0, 65504.0],
    "FP32": [1.5, -0.0, 3.4028234663852886e38],
    "FP64": [1e-300, -1.5, 3.141592653589793],
    "BYTES": [b"", b"abc", b"\x00\xff\x00"],
}

NUMPY = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}


def expected_array(datatype, shape=(1, 3)):
    return np.array(VALUES[datatype], dtype=NUMPY[datatype]).reshape(shape)


def triton_request(arrays, model_name="m", model_version="", request_id="", outputs=()):
    """Request bytes exactly as tritonclient's InferenceServerClient.infer builds them."""
    inputs = []
    for name, (datatype, array) in arrays.items():
        infer_input = tritongrpc.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    requested = [tritongrpc.InferRequestedOutput(name) for name in outputs] or None
    request = tritonutils._get_inference_request(
        model_name=model_name, inputs=inputs, model_version=model_version,
        request_id=request_id, outputs=requested, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, parameters=None,
    )
    return request.SerializeToString()


def typed_request(inputs, model_name="m", model_version="", outputs=()):
    """Request bytes with typed InferTensorContents: inputs = [(name, datatype, shape, values)]."""
    request = _v2.ModelInferRequest(model_name=model_name, model_version=model_version)
    for name, datatype, shape, values in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        getattr(tensor.contents, tensors.CONTENTS_FIELD[datatype]).extend(values)
    for name in outputs:
        request.outputs.add(name=name)
    return request.SerializeToString()


def raw_request(inputs, model_name="m", model_version="", outputs=(), raw=None):
    """Request bytes with raw contents: inputs = [(name, datatype, shape, bytes)]."""
    request = _v2.ModelInferRequest(model_name=model_name, model_version=model_version)
    for name, datatype, shape, data in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        request.raw_input_contents.append(data)
    if raw is not None:
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request.SerializeToString()


def raw_contents(datatype, array):
    """tensors.to_buffer as bytes."""
    return bytes(tensors.to_buffer(datatype, array))


def response_of(data):
    return _v2.ModelInferResponse.FromString(data)


class InvalidArgumentMixin:
    def assertInvalid(self, f, *args, **kwargs):
        error = self.assertRaises(InferenceError, f, *args, **kwargs)
        self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT, error.message)
        return error


class DatatypeTests(SynchronousTestCase):
    """as_numpy for every v2 datatype, raw and typed."""

    def assertSameArray(self, got, want):
        self.assertEqual(got.dtype, want.dtype)
        self.assertEqual(got.shape, want.shape)
        if want.dtype == object:
            self.assertEqual(got.tolist(), want.tolist())
            for item in got.reshape(-1):
                self.assertIsInstance(item, bytes)
        else:
            # Compare bit patterns too, so -0.0 and 0.0 are told apart.
            self.assertEqual(got.tobytes(), want.tobytes())
            np.testing.assert_array_equal(got, want)

    def test_table_covers_every_datatype(self):
        """DATATYPES and CONTENTS_FIELD cover exactly the 13 v2 datatypes."""
        self.assertEqual(set(tensors.DATATYPES), set(VALUES))
        self.assertEqual(set(tensors.CONTENTS_FIELD), set(VALUES))

    def test_raw_from_tritonclient(self):
        """Every datatype sent by tritonclient (raw contents) decodes exactly."""
        for datatype in VALUES:
            want = expected_array(datatype)
            model = Model(lambda r: None, "m", inputs=[("x", datatype, [-1, 3])])
            request = model.decode(triton_request({"x": (datatype, want)}))
            self.assertSameArray(request["x"], want)
            self.assertEqual(request.inputs["x"].datatype, datatype)
            self.assertEqual(request.inputs["x"].shape, (1, 3))

    def test_raw_from_our_protos(self):
        """Every datatype as raw contents built by hand (little-endian, BYTES prefixed)."""
        for datatype in VALUES:
            want = expected_array(datatype)
            if datatype == "BYTES":
                data = b"".join(len(v).to_bytes(4, "little") + v for v in VALUES[datatype])
            else:
                data = want.astype(want.dtype.newbyteorder("<")).tobytes()
            model = Model(lambda r: None, "m")
            request = model.decode(raw_request([("x", datatype, (1, 3), data)]))
            self.assertSameArray(request.inputs["x"].as_numpy(), want)

    def test_typed_contents(self):
        """Every datatype sent as typed InferTensorContents decodes exactly."""
        for datatype in VALUES:
            want = expected_array(datatype)
            model = Model(lambda r: None, "m", inputs=[("x", datatype, [1, 3])])
            request = model.decode(typed_request([("x", datatype, (1, 3), VALUES[datatype])]))
            self.assertSameArray(request["x"], want)

    def test_typed_from_tritonclient_messages(self):
        """Typed contents built with tritonclient's own message classes."""
        request = triton.ModelInferRequest(model_name="m")
        tensor = request.inputs.add(name="x", datatype="UINT64", shape=[2])
        tensor.contents.uint64_contents.extend([2**64 - 1, 7])
        got = Model(lambda r: None, "m").decode(request.SerializeToString())["x"]
        self.assertSameArray(got, np.array([2**64 - 1, 7], dtype=np.uint64))

    def test_multidimensional(self):
        """Raw contents are row-major: a (2, 3, 2) tensor keeps its layout."""
        want = np.arange(12, dtype=np.int32).reshape(2, 3, 2)
        model = Model(lambda r: None, "m")
        self.assertSameArray(model.decode(triton_request({"x": ("INT32", want)}))["x"], want)

    def test_bytes_2d(self):
        """BYTES tensors are reshaped like numbers."""
        want = np.array([[b"a", b"bb"], [b"", b"dddd"]], dtype=object)
        got = Model(lambda r: None, "m").decode(triton_request({"x": ("BYTES", want)}))["x"]
        self.assertSameArray(got, want)

    def test_empty_tensor(self):
        """A tensor with a zero dimension decodes to an empty array of its dtype."""
        got = Model(lambda r: None, "m").decode(raw_request([("x", "FP32", (0, 4), b"")]))["x"]
        self.assertEqual(got.shape, (0, 4))
        self.assertEqual(got.dtype, np.float32)

    def test_datatype_of(self):
        """datatype_of maps numpy dtypes back to v2 names."""
        for datatype in VALUES:
            self.assertEqual(tensors.datatype_of(expected_array(datatype)), datatype)
        self.assertEqual(tensors.datatype_of(np.array(["a"])), "BYTES")
        self.assertEqual(tensors.datatype_of(np.array([b"a"])), "BYTES")
        self.assertEqual(tensors.datatype_of(np.array([1.0], dtype=">f4")), "FP32")
        error = self.assertRaises(InferenceError, tensors.datatype_of, np.array([1j]))
        self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT)

    def test_to_raw_is_little_endian(self):
        """Raw contents are written little-endian whatever the array's byte order."""
        big = np.array([1, 2], dtype=">i4")
        self.assertEqual(raw_contents("INT32", big), b"\x01\x00\x00\x00\x02\x00\x00\x00")
        self.assertEqual(raw_contents("FP16", np.array([1.0])), b"\x00\x3c")
        # Non-contiguous input (a transposed view) comes out row-major.
        grid = np.arange(6, dtype="<u2").reshape(2, 3).T
        self.assertEqual(raw_contents("UINT16", grid), grid.copy().tobytes())


class BytesEncodingTests(SynchronousTestCase, InvalidArgumentMixin):
    """BYTES length-prefix encoding."""

    def test_round_trip(self):
        """encode_bytes then decode_bytes gives the elements back."""
        items = [b"", b"x", b"\x00" * 70000, "caf\u00e9".encode("utf-8")]
        data = tensors.encode_bytes(items)
        self.assertEqual(data[:8], b"\x00\x00\x00\x00\x01\x00\x00\x00")
        self.assertEqual(tensors.decode_bytes(data), items)
        self.assertEqual(tensors.decode_bytes(data, 4), items)

    def test_str_and_other_items(self):
        """str is encoded as UTF-8, other objects by their str()."""
        data = tensors.encode_bytes(["caf\u00e9", 12, bytearray(b"ab")])
        self.assertEqual(tensors.decode_bytes(data), [b"caf\xc3\xa9", b"12", b"ab"])

    def test_matches_tritonclient(self):
        """Our encoding is byte-for-byte tritonclient's serialize_byte_tensor."""
        array = np.array([b"one", b"", b"three"], dtype=object)
        self.assertEqual(
            tensors.encode_bytes(array.tolist()),
            tritonutils.serialize_byte_tensor(array).item(),
        )
        self.assertEqual(raw_contents("BYTES", array), tritonutils.serialize_byte_tensor(array).item())

    def test_empty(self):
        """No elements: no bytes."""
        self.assertEqual(tensors.encode_bytes([]), b"")
        self.assertEqual(tensors.decode_bytes(b""), [])

    def test_truncated_prefix(self):
        """A length prefix cut short is INVALID_ARGUMENT."""
        self.assertInvalid(tensors.decode_bytes, b"\x01\x00\x00")
        self.assertInvalid(tensors.decode_bytes, tensors.encode_bytes([b"a"]) + b"\x01")

    def test_element_past_end(self):
        """An element longer than what is left is INVALID_ARGUMENT."""
        self.assertInvalid(tensors.decode_bytes, b"\x05\x00\x00\x00abc")
        self.assertInvalid(tensors.decode_bytes, b"\xff\xff\xff\xff")

    def test_count_mismatch(self):
        """More or fewer elements than the shape needs is INVALID_ARGUMENT."""
        data = tensors.encode_bytes([b"a", b"b"])
        self.assertInvalid(tensors.decode_bytes, data, 3)
        self.assertInvalid(tensors.decode_bytes, data, 1)
        self.assertInvalid(tensors.from_raw, "BYTES", (3,), data)

    def test_huge_bytes_shape_rejected(self):
        """A BYTES shape far larger than its contents is INVALID_ARGUMENT, not a crash.

        The element count must be checked against the contents before any
        array of that size is allocated.
        """
        self.assertInvalid(tensors.from_raw, "BYTES", (2**62,), b"")
        self.assertInvalid(tensors.from_raw, "BYTES", (2**31, 2**31), tensors.encode_bytes([b"a"]))


class DecodeErrorTests(SynchronousTestCase, InvalidArgumentMixin):
    """Model.decode rejects bad requests with INVALID_ARGUMENT."""

    def setUp(self):
        self.model = Model(
            lambda r: None, "m",
            inputs=[("a", "FP32", [-1, 3]), ("b", "INT64", [2])],
            outputs=[("y", "FP32", [-1])],
        )

    def good_inputs(self):
        return [
            ("a", "FP32", (4, 3), np.zeros((4, 3), np.float32).tobytes()),
            ("b", "INT64", (2,), np.array([1, 2], np.int64).tobytes()),
        ]

    def test_good_request(self):
        """The baseline request used below is accepted."""
        request = self.model.decode(raw_request(self.good_inputs()))
        self.assertEqual(request["a"].shape, (4, 3))
        self.assertEqual(request["b"].tolist(), [1, 2])

    def test_wildcard_shapes(self):
        """-1 matches any size, including 0 and 1."""
        for rows in (0, 1, 100):
            inputs = self.good_inputs()
            inputs[0] = ("a", "FP32", (rows, 3), np.zeros((rows, 3), np.float32).tobytes())
            self.assertEqual(self.model.decode(raw_request(inputs))["a"].shape, (rows, 3))

    def test_raw_size_mismatch(self):
        """Raw contents too short or too long for the shape."""
        for size in (47, 49, 0):
            inputs = self.good_inputs()
            inputs[0] = ("a", "FP32", (4, 3), b"\x00" * size)
            error = self.assertInvalid(self.model.decode, raw_request(inputs))
            self.assertIn("expected 48", error.message)

    def test_missing_input(self):
        """A declared input not sent."""
        error = self.assertInvalid(self.model.decode, raw_request(self.good_inputs()[:1]))
        self.assertIn("missing input(s): b", error.message)

    def test_no_inputs_at_all(self):
        """An empty request for a model with inputs."""
        self.assertInvalid(self.model.decode, b"")

    def test_unexpected_input(self):
        """An input the model does not declare."""
        inputs = self.good_inputs() + [("c", "FP32", (1,), b"\x00" * 4)]
        error = self.assertInvalid(self.model.decode, raw_request(inputs))
        self.assertIn("'c'", error.message)

    def test_input_twice(self):
        """The same input name twice."""
        inputs = self.good_inputs() + [self.good_inputs()[1]]
        self.assertInvalid(self.model.decode, raw_request(inputs))

    def test_wrong_datatype(self):
        """A declared input sent with another datatype."""
        inputs = self.good_inputs()
        inputs[1] = ("b", "INT32", (2,), np.array([1, 2], np.int32).tobytes())
        error = self.assertInvalid(self.model.decode, raw_request(inputs))
        self.assertIn("INT64", error.message)

    def test_unknown_datatype(self):
        """A datatype that is not a v2 datatype, with or without specs."""
        inputs = [("a", "FP8", (3,), b"\x00" * 3)]
        self.assertInvalid(Model(lambda r: None, "m").decode, raw_request(inputs))
        self.assertInvalid(self.model.decode, raw_request(inputs))

    def test_wrong_shape(self):
        """Wrong size in a fixed dimension, or wrong rank."""
        for shape in [(4, 2), (4,), (4, 3, 1), (2, 2, 3)]:
            count = int(np.prod(shape))
            inputs = self.good_inputs()
            inputs[0] = ("a", "FP32", shape, np.zeros(count, np.float32).tobytes())
            self.assertInvalid(self.model.decode, raw_request(inputs))
        inputs = self.good_inputs()
        inputs[1] = ("b", "INT64", (3,), np.zeros(3, np.int64).tobytes())
        self.assertInvalid(self.model.decode, raw_request(inputs))

    def test_negative_dimension(self):
        """A negative dimension in a request shape."""
        inputs = self.good_inputs()
        inputs[0] = ("a", "FP32", (-4, 3), b"")
        self.assertInvalid(self.model.decode, raw_request(inputs))
        self.assertInvalid(Model(lambda r: None, "m").decode, raw_request(inputs))

    def test_raw_count_mismatch(self):
        """raw_input_contents count differs from the input count."""
        inputs = self.good_inputs()
        self.assertInvalid(self.model.decode, raw_request(inputs, raw=[inputs[0][3]]))
        self.assertInvalid(
            self.model.decode, raw_request(inputs, raw=[i[3] for i in inputs] + [b""])
        )

    def test_typed_count_mismatch(self):
        """Typed contents with the wrong number of elements (or the wrong field)."""
        self.assertInvalid(
            self.model.decode,
            typed_request([("a", "FP32", (1, 3), [1.0, 2.0]), ("b", "INT64", (2,), [1, 2])]),
        )
        request = _v2.ModelInferRequest()
        a = request.inputs.add(name="a", datatype="FP32", shape=[1, 3])
        a.contents.fp64_contents.extend([1.0, 2.0, 3.0])  # wrong field for FP32
        b = request.inputs.add(name="b", datatype="INT64", shape=[2])
        b.contents.int64_contents.extend([1, 2])
        self.assertInvalid(self.model.decode, request.SerializeToString())

    def test_malformed_bytes(self):
        """Bytes that are not a ModelInferRequest."""
        for data in (b"\x0a\x05ab", b"\xff\xff\xff", b"\x2a\x10" + b"\x00" * 3):
            error = self.assertInvalid(self.model.decode, data)
            self.assertIn("malformed", error.message)

    def test_malformed_bytes_tensor(self):
        """A BYTES input whose length prefixes are wrong."""
        model = Model(lambda r: None, "m", inputs=[("s", "BYTES", [-1])])
        self.assertInvalid(model.decode, raw_request([("s", "BYTES", (1,), b"\x09\x00\x00\x00abc")]))
        self.assertInvalid(model.decode, raw_request([("s", "BYTES", (2,), tensors.encode_bytes([b"a"]))]))

    def test_unknown_requested_output(self):
        """Asking for an output the model does not declare."""
        error = self.assertInvalid(
            self.model.decode, raw_request(self.good_inputs(), outputs=["y", "nope"])
        )
        self.assertIn("nope", error.message)

    def test_tensor_spec(self):
        """TensorSpec rejects unknown datatypes; as_spec accepts tuples and dicts."""
        self.assertRaises(ValueError, TensorSpec, "x", "FLOAT")
        model = Model(lambda r: None, "m", inputs=[{"name": "x", "datatype": "FP32", "shape": [2]},
                                                   ("y", "INT8")])
        self.assertEqual(model.inputs, [TensorSpec("x", "FP32", (2,)), TensorSpec("y", "INT8", (-1,))])


class EncodeTests(SynchronousTestCase, InvalidArgumentMixin):
    """Model.encode: handler results become raw_output_contents."""

    def decode_encode(self, model, result, outputs=(), request_id="rid"):
        request = _v2.ModelInferRequest(model_name=model.name, id=request_id)
        for name in outputs:
            request.outputs.add(name=name)
        decoded = model.decode(request.SerializeToString())
        return response_of(model.encode(decoded, result))

    def assertRawOutputs(self, response, expected):
        """expected: [(name, datatype, array)], in response order."""
        self.assertEqual([o.name for o in response.outputs], [name for name, _, _ in expected])
        self.assertEqual(len(response.raw_output_contents), len(expected))
        for tensor, raw, (name, datatype, array) in zip(
            response.outputs, response.raw_output_contents, expected
        ):
            self.assertEqual(tensor.datatype, datatype, name)
            self.assertEqual(list(tensor.shape), list(array.shape), name)
            self.assertFalse(tensor.HasField("contents"), name)
            got = tensors.from_raw(datatype, tuple(tensor.shape), raw)
            self.assertEqual(got.dtype, tensors.DATATYPES[datatype], name)
            self.assertEqual(got.tolist(), array.tolist(), name)

    def test_every_datatype_with_spec(self):
        """Declared outputs come back raw with their declared datatype and shape."""
        for datatype in VALUES:
            want = expected_array(datatype)
            model = Model(lambda r: None, "m", outputs=[("y", datatype, [-1, 3])])
            response = self.decode_encode(model, {"y": want})
            self.assertRawOutputs(response, [("y", datatype, want)])

    def test_every_datatype_inferred(self):
        """Without output specs the datatype comes from the array's dtype."""
        for datatype in VALUES:
            want = expected_array(datatype)
            model = Model(lambda r: None, "m")
            response = self.decode_encode(model, {"y": want})
            self.assertRawOutputs(response, [("y", datatype, want)])

    def test_readable_by_tritonclient(self):
        """tritonclient's InferResult reads our response back."""
        model = Model(lambda r: None, "m", version="3",
                      outputs=[("f", "FP32", [-1]), ("s", "BYTES", [-1])])
        data = model.encode(
            model.decode(b""), {"f": np.array([1.5, 2.5]), "s": ["a", "\u00e9"]}
        )
        result = tritongrpc.InferResult(triton.ModelInferResponse.FromString(data))
        f = result.as_numpy("f")
        self.assertEqual(f.dtype, np.float32)
        self.assertEqual(f.tolist(), [1.5, 2.5])
        self.assertEqual(result.as_numpy("s").tolist(), [b"a", "\u00e9".encode("utf-8")])
        response = result.get_response()
        self.assertEqual((response.model_name, response.model_version), ("m", "3"))

    def test_spec_converts_dtype(self):
        """A float64 array for an FP32 output is sent as FP32."""
        model = Model(lambda r: None, "m", outputs=[("y", "FP32", [-1])])
        response = self.decode_encode(model, {"y": np.array([0.25, 1.0], dtype=np.float64)})
        self.assertEqual(response.outputs[0].datatype, "FP32")
        self.assertEqual(response.raw_output_contents[0], np.array([0.25, 1.0], "<f4").tobytes())

    def test_id_and_names(self):
        """The response carries the model name, version and the request id."""
        model = Model(lambda r: None, "m", version="7", outputs=[("y", "INT32", [-1])])
        response = self.decode_encode(model, [1], request_id="abc")
        self.assertEqual(
            (response.model_name, response.model_version, response.id), ("m", "7", "abc")
        )

    def test_result_dict(self):
        """A dict of name -> array, every output in dict order."""
        model = Model(lambda r: None, "m")
        response = self.decode_encode(model, {"b": np.int64([1]), "a": np.float32([2])})
        self.assertRawOutputs(
            response, [("b", "INT64", np.int64([1])), ("a", "FP32", np.float32([2]))]
        )

    def test_result_single_array(self):
        """A single array for a model declaring exactly one output."""
        model = Model(lambda r: None, "m", outputs=[("only", "INT16", [-1])])
        response = self.decode_encode(model, np.array([3, 4]))
        self.assertRawOutputs(response, [("only", "INT16", np.int16([3, 4]))])

    def test_result_plain_list(self):
        """A plain list as a value: converted to the declared (or inferred) datatype."""
        model = Model(lambda r: None, "m", outputs=[("only", "UINT8", [-1])])
        response = self.decode_encode(model, [1, 2, 255])
        self.assertRawOutputs(response, [("only", "UINT8", np.uint8([1, 2, 255]))])
        response = self.decode_encode(Model(lambda r: None, "m"), {"y": [[1.5, 2.0]]})
        self.assertRawOutputs(response, [("y", "FP64", np.float64([[1.5, 2.0]]))])
        response = self.decode_encode(Model(lambda r: None, "m"), {"s": ["x", "yz"]})
        self.assertRawOutputs(response, [("s", "BYTES", np.array([b"x", b"yz"], dtype=object))])

    def test_result_list_of_pairs(self):
        """A list of (name, value) pairs keeps its order."""
        model = Model(lambda r: None, "m")
        response = self.decode_encode(model, [("z", np.int32([1])), ("a", np.int32([2]))])
        self.assertRawOutputs(response, [("z", "INT32", np.int32([1])), ("a", "INT32", np.int32([2]))])

    def test_infer_response_parameters(self):
        """InferResponse carries parameters of every kind to the response."""
        model = Model(lambda r: None, "m")
        result = InferResponse({"y": np.int8([1])},
                               parameters={"b": True, "i": 3, "f": 0.5, "s": "txt"})
        response = self.decode_encode(model, result)
        params = response.parameters
        self.assertEqual(params["b"].WhichOneof("parameter_choice"), "bool_param")
        self.assertTrue(params["b"].bool_param)
        self.assertEqual(params["i"].int64_param, 3)
        self.assertEqual(params["f"].double_param, 0.5)
        self.assertEqual(params["s"].string_param, "txt")
        self.assertRawOutputs(response, [("y", "INT8", np.int8([1]))])

    def test_single_array_needs_single_output(self):
        """A bare array for a model with two outputs (or none declared) is a TypeError."""
        two = Model(lambda r: None, "m", outputs=[("a", "FP32", [-1]), ("b", "FP32", [-1])])
        self.assertRaises(TypeError, self.decode_encode, two, np.float32([1]))
        self.assertRaises(TypeError, self.decode_encode, Model(lambda r: None, "m"), np.float32([1]))

    def test_requested_subset_and_order(self):
        """Only requested outputs come back, in the order asked."""
        model = Model(lambda r: None, "m",
                      outputs=[("a", "INT32", [-1]), ("b", "FP32", [-1]), ("c", "BYTES", [-1])])
        result = {"a": [1], "b": [2.0], "c": [b"3"]}
        response = self.decode_encode(model, result, outputs=["c", "a"])
        self.assertRawOutputs(
            response, [("c", "BYTES", np.array([b"3"], dtype=object)), ("a", "INT32", np.int32([1]))]
        )
        response = self.decode_encode(model, result, outputs=["b"])
        self.assertRawOutputs(response, [("b", "FP32", np.float32([2.0]))])
        response = self.decode_encode(model, result)
        self.assertEqual([o.name for o in response.outputs], ["a", "b", "c"])

    def test_requested_unknown_without_specs(self):
        """Without declared outputs, asking for one the handler did not produce."""
        model = Model(lambda r: None, "m")
        error = self.assertInvalid(self.decode_encode, model, {"a": [1]}, outputs=["zz"])
        self.assertIn("zz", error.message)

    def test_requested_not_produced_with_specs(self):
        """A declared, requested output the handler did not produce is INTERNAL."""
        model = Model(lambda r: None, "m", outputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])])
        error = self.assertRaises(InferenceError, self.decode_encode, model, {"a": [1]}, outputs=["b"])
        self.assertEqual(error.code, grpc.StatusCode.INTERNAL)


class AppTests(SynchronousTestCase, InvalidArgumentMixin):
    """AnyServe.route and AnyServe.handle."""

    def setUp(self):
        self.app = AnyServe()

        @self.app.model("add", inputs=[("a", "INT32", [-1]), ("b", "INT32", [-1])],
                        outputs=[("sum", "INT32", [-1]), ("diff", "INT32", [-1])])
        def add(request):
            return {"sum": request["a"] + request["b"], "diff": request["a"] - request["b"]}

        @self.app.model("fail")
        def fail(request):
            raise ZeroDivisionError("division by zero in the handler")

        @self.app.model("reject")
        def reject(request):
            raise InferenceError(grpc.StatusCode.FAILED_PRECONDITION, "not today")

    def test_handle(self):
        """A request from tritonclient round-trips through a handler."""
        data = triton_request(
            {"a": ("INT32", np.int32([1, 2, 3])), "b": ("INT32", np.int32([10, 20, 30]))},
            model_name="add", request_id="r1",
        )
        response = response_of(self.app.handle(data))
        self.assertEqual((response.model_name, response.id), ("add", "r1"))
        self.assertEqual([o.name for o in response.outputs], ["sum", "diff"])
        self.assertEqual(np.frombuffer(response.raw_output_contents[0], "<i4").tolist(), [11, 22, 33])
        self.assertEqual(np.frombuffer(response.raw_output_contents[1], "<i4").tolist(), [-9, -18, -27])

    def test_handle_requested_outputs(self):
        """handle honours the requested outputs."""
        data = triton_request(
            {"a": ("INT32", np.int32([5])), "b": ("INT32", np.int32([1]))},
            model_name="add", outputs=["diff"],
        )
        response = response_of(self.app.handle(data))
        self.assertEqual([o.name for o in response.outputs], ["diff"])
        self.assertEqual(np.frombuffer(response.raw_output_contents[0], "<i4").tolist(), [4])

    def test_handle_invalid_request(self):
        """Validation errors surface from handle as INVALID_ARGUMENT."""
        data = triton_request({"a": ("INT32", np.int32([5]))}, model_name="add")
        self.assertInvalid(self.app.handle, data)
        self.assertInvalid(self.app.handle, b"\x0a\x09add")

    def test_handler_exception_is_internal(self):
        """A handler's own exception becomes INTERNAL carrying its message."""
        data = _v2.ModelInferRequest(model_name="fail").SerializeToString()
        error = self.assertRaises(InferenceError, self.app.handle, data)
        self.assertEqual(error.code, grpc.StatusCode.INTERNAL)
        self.assertIn("division by zero in the handler", error.message)
        self.assertIn("ZeroDivisionError", error.message)
        self.assertIn("'fail'", error.message)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)  # traceback logged

    def test_handler_inference_error_passes(self):
        """An InferenceError raised by a handler keeps its code and message."""
        data = _v2.ModelInferRequest(model_name="reject").SerializeToString()
        error = self.assertRaises(InferenceError, self.app.handle, data)
        self.assertEqual(error.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(error.message, "not today")

    def test_bad_result_is_internal(self):
        """A handler returning something unusable is INTERNAL, not a stray exception."""

        @self.app.model("bad", outputs=[("a", "FP32", [-1]), ("b", "FP32", [-1])])
        def bad(request):
            return np.float32([1.0])

        @self.app.model("notnumbers", outputs=[("a", "FP32", [-1])])
        def notnumbers(request):
            return {"a": ["not", "numbers"]}

        for name in ("bad", "notnumbers"):
            data = _v2.ModelInferRequest(model_name=name).SerializeToString()
            error = self.assertRaises(InferenceError, self.app.handle, data)
            self.assertEqual(error.code, grpc.StatusCode.INTERNAL, name)
            self.assertIn("'%s'" % name, error.message)
        # Strings for a number output are refused by name, without a traceback.
        self.assertIn("output 'a' is declared FP32, but the handler returned str values", error.message)
        self.assertEqual(len(self.flushLoggedErrors(TypeError, ValueError)), 1)

    def test_duplicate_registration(self):
        """Registering the same (name, version) twice is refused."""
        decorator = self.app.model("add")
        self.assertRaises(ValueError, decorator, lambda r: None)

    def versioned_app(self, *versions):
        app = AnyServe()
        for version in versions:
            app.model("m", version=version)(lambda request, v=version: {"v": np.array([v], dtype=object)})
        return app

    def served_version(self, app, version=""):
        data = _v2.ModelInferRequest(model_name="m", model_version=version).SerializeToString()
        response = response_of(app.handle(data))
        return response.model_version, tensors.decode_bytes(response.raw_output_contents[0])[0]

    def test_versions_highest(self):
        """Without a version the highest in natural order serves: 10 beats 2."""
        app = self.versioned_app("1", "10", "2")
        self.assertEqual(app.route(_v2.ModelInferRequest(model_name="m").SerializeToString()).version, "10")
        self.assertEqual(self.served_version(app), ("10", b"10"))
        self.assertEqual(self.served_version(app, "2"), ("2", b"2"))

    def test_versions_prefixed(self):
        """v10 beats v2 and v9."""
        app = self.versioned_app("v2", "v10", "v9")
        self.assertEqual(self.served_version(app), ("v10", b"v10"))

    def test_versions_unversioned_wins(self):
        """A model registered without a version is the default."""
        app = self.versioned_app("3", "", "9")
        self.assertEqual(self.served_version(app), ("", b""))
        self.assertEqual(self.served_version(app, "9"), ("9", b"9"))

    def test_route_not_found(self):
        """Unknown model or version: NOT_FOUND."""
        app = self.versioned_app("1")
        for name, version in (("zz", ""), ("zz", "1"), ("m", "2")):
            data = _v2.ModelInferRequest(model_name=name, model_version=version).SerializeToString()
            error = self.assertRaises(InferenceError, app.route, data)
            self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND, (name, version))
            self.assertIn("'%s'" % name, error.message)

    def test_route_malformed(self):
        """Garbage request bytes: INVALID_ARGUMENT before any handler runs."""
        self.assertInvalid(self.app.route, b"\x0a\x05ab")


class TypedRangeTests(SynchronousTestCase):
    def test_out_of_range_typed_ints_are_invalid(self):
        """int_contents is 32-bit: an INT8 tensor must not silently wrap 300."""
        contents = protos.inference.InferTensorContents(int_contents=[300, -129])
        with self.assertRaises(InferenceError) as caught:
            tensors.from_contents("INT8", (2,), contents)
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        ok = protos.inference.InferTensorContents(int_contents=[127, -128])
        self.assertEqual(tensors.from_contents("INT8", (2,), ok).tolist(), [127, -128])


class ShapeLimitTests(SynchronousTestCase, InvalidArgumentMixin):
    """Shapes numpy cannot make are INVALID_ARGUMENT, checked with Python
    ints before numpy sees them (numpy raises ValueError, which reached the
    client as INTERNAL with a traceback logged per request)."""

    HUGE = [(2**63 - 1, 0), (0, 2**63 - 1), (2**62, 2, 0), (2**31, 2**31, 0), (2**57, 0)]

    def test_huge_empty_shapes_raw(self):
        for datatype in VALUES:
            for shape in self.HUGE:
                error = self.assertInvalid(tensors.from_raw, datatype, shape, b"")
                self.assertIn("too large", error.message, (datatype, shape))

    def test_huge_empty_shapes_typed(self):
        for datatype in VALUES:
            for shape in self.HUGE:
                self.assertInvalid(tensors.from_contents, datatype, shape, _v2.InferTensorContents())

    def test_largest_empty_extent_is_an_array(self):
        """The limit sits below numpy's: 2**56 elements (of 8 bytes) still reshape."""
        for datatype in ("FP64", "BYTES", "INT8"):
            self.assertEqual(tensors.from_raw(datatype, (2**56, 0), b"").shape, (2**56, 0))

    def test_too_many_dimensions(self):
        self.assertEqual(tensors.from_raw("INT32", (1,) * 32, b"\0" * 4).shape, (1,) * 32)
        error = self.assertInvalid(tensors.from_raw, "INT32", (1,) * 1000, b"\0" * 4)
        self.assertIn("(1000 dimensions)", error.message)
        self.assertLess(len(error.message), 200)

    def test_decode(self):
        """Through Model.decode, with and without specs, raw and typed."""
        for model in (Model(lambda r: None, "m", inputs=[("x", "FP32", [-1, -1])]),
                      Model(lambda r: None, "m")):
            self.assertInvalid(model.decode, raw_request([("x", "FP32", (2**63 - 1, 0), b"")]))
            self.assertInvalid(model.decode, typed_request([("x", "FP32", (2**63 - 1, 0), [])]))


class OutputCastTests(SynchronousTestCase):
    """as_datatype: a handler's output as its declared datatype, refusing
    casts that change values."""

    def refused(self, value, datatype):
        return str(self.assertRaises(tensors.LossyCast, tensors.as_datatype, value, datatype))

    def assertCast(self, value, datatype, expected):
        array = tensors.as_datatype(value, datatype)
        self.assertEqual(array.dtype, tensors.DATATYPES[datatype])
        self.assertEqual(array.tolist(), expected)

    def test_exact_casts_allowed(self):
        self.assertCast(np.int32([1, -2]), "INT64", [1, -2])
        self.assertCast([1, 2], "INT8", [1, 2])
        self.assertCast(5, "UINT16", 5)
        self.assertCast(np.float32([100.0, -3.0]), "INT8", [100, -3])
        self.assertCast(np.int64([0, 255]), "UINT8", [0, 255])
        self.assertCast(np.uint64([2**63 - 1]), "INT64", [2**63 - 1])
        self.assertCast(np.float64([-(2.0**63)]), "INT64", [-(2**63)])
        self.assertCast([True, False], "FP16", [1.0, 0.0])
        self.assertCast(np.float64([1.0, 0.0]), "BOOL", [True, False])
        self.assertCast(np.array([], dtype=np.float64), "INT8", [])
        self.assertCast(np.array([1, 2], dtype=">i4"), "INT32", [1, 2])

    def test_float_precision_is_not_a_change(self):
        """Floats round (float64 into FP32 is the common case); NaN and
        infinities stay what they are."""
        array = tensors.as_datatype(np.float64([0.1, np.nan, -np.inf]), "FP32")
        self.assertEqual(array.dtype, np.float32)
        self.assertEqual(array[0], np.float32(0.1))
        self.assertTrue(np.isnan(array[1]) and array[2] == -np.inf)
        self.assertCast(np.int64([2**53 + 1]), "FP64", [float(2**53)])
        self.assertCast(np.uint64([2**64 - 1]), "FP32", [float(np.float32(2**64))])

    def test_lossy_casts_refused(self):
        cases = [
            (np.float32([100.0, 200.0]), "INT8", "float32 values it can't hold: 200.0 is out of range"),
            ([1.5], "INT32", "float64 values it can't hold: 1.5 has a fractional part"),
            (np.float64([1.0, np.nan]), "INT64", "float64 values it can't hold: nan"),
            (np.float64([np.inf]), "UINT8", "float64 values it can't hold: inf"),
            (np.float64([2.0**63]), "INT64", "out of range"),
            (np.int64([2**40]), "INT32", "int64 values it can't hold: 1099511627776 is out of range"),
            (np.int64([-1]), "UINT64", "int64 values it can't hold: -1 is out of range"),
            (np.uint64([2**63]), "INT64", "uint64 values it can't hold: 9223372036854775808 is out of range"),
            (np.int64([2, 1]), "BOOL", "int64 values it can't hold: 2 is neither 0 nor 1"),
            (np.float64([0.5]), "BOOL", "0.5 has a fractional part"),
            (np.float64([1e300]), "FP32", "float64 values it can't hold: 1e+300 is out of range"),
            (np.int64([70000]), "FP16", "int64 values it can't hold: 70000 is out of range"),
            (["1", "2"], "INT32", "str values, which are not numbers"),
            ([b"1"], "INT32", "bytes values, which are not numbers"),
            (2**64, "UINT64", "object values"),
            (np.array([1j]), "FP32", "complex128 values, which have no v2 datatype"),
            ([[1], [1, 2]], "INT32", "a value numpy cannot make an array of"),
        ]
        for value, datatype, message in cases:
            self.assertIn(message, self.refused(value, datatype), (value, datatype))

    def test_bytes_takes_anything(self):
        """BYTES outputs keep their elements (encoded by to_buffer)."""
        self.assertEqual(tensors.as_datatype(["a", b"b", 1], "BYTES").tolist(), ["a", b"b", 1])
