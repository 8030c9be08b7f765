"""REST bodies as tritonclient.http builds and reads them, through the
worker's codec and its models."""
import json

import grpc
import numpy as np
import tritonclient.http as httpclient
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos, protowire
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.wire.payloads import http_request_parts
from anyserve_tw.worker import restcodec
from anyserve_tw.worker.model import Model
from anyserve_tw.worker.parsing import parse_request

_v2 = protos.inference
generate = httpclient.InferenceServerClient.generate_request_body
parse_response = httpclient.InferenceServerClient.parse_response_body

NUMERIC = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


def sample(datatype, shape=(2, 3)):
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array(["é%d" % i for i in range(count)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return (np.arange(count) % 2 == 0).reshape(shape)
    dtype = np.dtype(NUMERIC[datatype])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = np.arange(count, dtype=dtype)
        values[0] = info.max  # the extremes survive JSON
        values[-1] = info.min
        return values.reshape(shape)
    return (np.arange(count, dtype=dtype) / 4 - 1).reshape(shape)


def tensor(name, array, binary):
    datatype = "BYTES" if array.dtype == object else next(k for k, v in NUMERIC.items() if np.dtype(v) == array.dtype)
    item = httpclient.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array, binary_data=binary)
    return item


def payload(body, json_length=None, name="m", version=""):
    return b"".join(http_request_parts(name, version, body, json_length))


def to_request(inputs, outputs=None, name="m", version="", **kwargs):
    """(ModelInferRequest, raw bytes of the request, options) for tritonclient's body."""
    body, json_length = generate(inputs, outputs, **kwargs)
    request_bytes, options = restcodec.infer_request_from_http(payload(body, json_length, name, version))
    return _v2.ModelInferRequest.FromString(request_bytes), request_bytes, options


def echo_model(**kwargs):
    return Model(lambda request: {n: t.as_numpy() for n, t in request.inputs.items()}, "echo", **kwargs)


def serve(request_bytes, model=None):
    return (model or echo_model()).serve(request_bytes)


def to_result(parts, options):
    """tritonclient's InferResult of what the codec answers, as the ingress sends it."""
    body_parts, json_length = restcodec.http_response_from_infer(parts, options)
    body = b"".join(bytes(p) for p in body_parts)
    return parse_response(body, header_length=None if json_length == len(body) else json_length), body, json_length


class RequestTests(SynchronousTestCase):
    def assertInvalid(self, body, fragment, json_length=None):
        with self.assertRaises(InferenceError) as caught:
            restcodec.infer_request_from_http(payload(body, json_length))
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn(fragment, caught.exception.message)
        return caught.exception.message

    def test_every_datatype_as_json_and_binary(self):
        for datatype in list(NUMERIC) + ["BYTES"]:
            array = sample(datatype)
            for binary in (False, True):
                message, request_bytes, _ = to_request([tensor("x", array, binary)], name="add", version="2")
                self.assertEqual((message.model_name, message.model_version), ("add", "2"))
                self.assertEqual((message.inputs[0].datatype, list(message.inputs[0].shape)), (datatype, [2, 3]))
                self.assertEqual(dict(message.inputs[0].parameters), {})  # binary_data_size is the HTTP's only
                decoded = echo_model().decode(request_bytes).inputs["x"].as_numpy()
                if datatype == "BYTES":
                    self.assertEqual(decoded.tolist(), [[s.encode() for s in row] for row in array.tolist()])
                else:
                    np.testing.assert_array_equal(decoded, array, err_msg="%s binary=%s" % (datatype, binary))
                    self.assertEqual(decoded.dtype, array.dtype)

    def test_binary_inputs_are_cut_in_order_between_json_ones(self):
        a, b, c = np.arange(3, dtype=np.int32), np.arange(5, dtype=np.float64), np.array([b"\x00\xff"], dtype=object)
        _, request_bytes, _ = to_request([tensor("a", a, True), tensor("b", b, False), tensor("c", c, True)])
        inputs = echo_model().decode(request_bytes).inputs
        np.testing.assert_array_equal(inputs["a"].as_numpy(), a)
        np.testing.assert_array_equal(inputs["b"].as_numpy(), b)
        self.assertEqual(inputs["c"].as_numpy().tolist(), [b"\x00\xff"])

    def test_nested_and_scalar_data(self):
        body = json.dumps({"inputs": [
            {"name": "n", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
            {"name": "r", "datatype": "FP32", "shape": [3], "data": [[1.5], [2, 3]]},  # uneven: Triton takes it
            {"name": "s", "datatype": "INT64", "shape": [], "data": [7]},
            {"name": "t", "datatype": "BYTES", "shape": [1, 2], "data": [["a", "b"]]},
            {"name": "e", "datatype": "INT8", "shape": [0], "data": []},
        ]}).encode()
        request_bytes, _ = restcodec.infer_request_from_http(payload(body))
        inputs = echo_model().decode(request_bytes).inputs
        self.assertEqual(inputs["n"].as_numpy().tolist(), [[1, 2], [3, 4]])
        self.assertEqual(inputs["r"].as_numpy().tolist(), [1.5, 2, 3])
        self.assertEqual((inputs["s"].as_numpy().shape, int(inputs["s"].as_numpy())), ((), 7))
        self.assertEqual(inputs["t"].as_numpy().tolist(), [[b"a", b"b"]])
        self.assertEqual(inputs["e"].as_numpy().shape, (0,))

    def test_parameters_reach_the_model_as_grpc_ones(self):
        x = tensor("x", np.arange(2, dtype=np.int32), False)
        x._parameters["note"] = "hi"
        outputs = [httpclient.InferRequestedOutput("y", binary_data=True, class_count=3),
                   httpclient.InferRequestedOutput("z", binary_data=False)]
        message, _, options = to_request(
            [x], outputs, request_id="r1", sequence_id=9, sequence_start=True, priority=2,
            parameters={"ratio": 0.5, "big": 2 ** 63, "flag": False, "text": "t"})
        self.assertEqual(message.id, "r1")
        params = {k: (v.WhichOneof("parameter_choice"), getattr(v, v.WhichOneof("parameter_choice")))
                  for k, v in message.parameters.items()}
        self.assertEqual(params, {
            "sequence_id": ("int64_param", 9), "sequence_start": ("bool_param", True),
            "sequence_end": ("bool_param", False), "priority": ("int64_param", 2),
            "ratio": ("double_param", 0.5), "big": ("uint64_param", 2 ** 63),
            "flag": ("bool_param", False), "text": ("string_param", "t")})
        self.assertEqual(message.inputs[0].parameters["note"].string_param, "hi")
        self.assertEqual([o.name for o in message.outputs], ["y", "z"])
        self.assertEqual(message.outputs[0].parameters["classification"].int64_param, 3)
        self.assertNotIn("binary_data", message.outputs[0].parameters)
        self.assertEqual(options, restcodec.ResponseOptions(False, {"y": True, "z": False}, frozenset()))

    def test_binary_data_output_is_the_default_for_unnamed_outputs(self):
        message, _, options = to_request([tensor("x", np.arange(2, dtype=np.int32), True)])
        self.assertNotIn("binary_data_output", message.parameters)
        self.assertTrue(options.is_binary("anything"))
        body = json.dumps({"inputs": [], "outputs": [{"name": "o"}],
                           "parameters": {"binary_data_output": True}}).encode()
        _, options = restcodec.infer_request_from_http(payload(body))
        self.assertFalse(options.is_binary("o"))  # named without binary_data: JSON, as Triton
        self.assertTrue(options.is_binary("other"))

    def test_shared_memory_tensors_carry_no_content(self):
        a = httpclient.InferInput("a", [4], "INT32")
        a.set_shared_memory("in", 16, offset=8)
        b = tensor("b", np.arange(4, dtype=np.int32), True)
        out = httpclient.InferRequestedOutput("o")
        out.set_shared_memory("out", 16)
        message, request_bytes, options = to_request([a, b], [out])
        self.assertEqual(message.inputs[0].parameters["shared_memory_region"].string_param, "in")
        self.assertEqual(message.inputs[0].parameters["shared_memory_byte_size"].int64_param, 16)
        self.assertEqual(message.inputs[0].parameters["shared_memory_offset"].int64_param, 8)
        self.assertEqual(len(parse_request(request_bytes).raw), 1)  # b's only, as tritonclient's gRPC
        self.assertEqual(message.outputs[0].parameters["shared_memory_region"].string_param, "out")
        self.assertEqual(options.shared_memory, frozenset(["o"]))

    def test_malformed_requests(self):
        ok = {"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]}

        def request(**changes):
            return json.dumps({"inputs": [dict(ok, **changes)]}).encode()

        self.assertInvalid(b"{", "malformed JSON")
        self.assertInvalid(b"\xff", "malformed JSON")
        self.assertInvalid(b"[" * 1500 + b"]" * 1500, "malformed JSON")  # too deep to parse
        self.assertInvalid(request(shape=[2 ** 63]), "'shape'")
        self.assertInvalid(b"[]", "JSON object")
        self.assertInvalid(b"{}", "'inputs' list")
        self.assertInvalid(b'{"inputs": [], "id": 5}', "'id'")
        self.assertInvalid(b'{"inputs": [], "parameters": {"binary_data_output": 1}}', "binary_data_output")
        self.assertInvalid(b'{"inputs": [], "parameters": {"p": [1]}}', "parameter 'p'")
        self.assertInvalid(b'{"inputs": [], "parameters": {"p": %d}}' % 2 ** 64, "64 bits")
        self.assertInvalid(b'{"inputs": [3]}', "input 0")
        self.assertInvalid(request(datatype="INT128"), "unknown datatype 'INT128'")
        self.assertInvalid(request(shape=[-2]), "'shape'")
        self.assertInvalid(request(shape="2"), "'shape'")
        self.assertInvalid(request(data=[1, 2, 3]), "'data' holds 3 elements, shape [2] needs 2")
        self.assertInvalid(request(data=[1.5, 2]), "INT32 'data' must hold integers")
        self.assertInvalid(request(data=["1", "2"]), "must hold integers")
        self.assertInvalid(request(data=[1, None]), "must hold integers")
        self.assertInvalid(request(datatype="INT8", data=[1, 300]), "out of range for INT8")
        self.assertInvalid(request(datatype="UINT64", data=[1, -1]), "out of range for UINT64")
        self.assertInvalid(request(datatype="INT64", data=[1, 2 ** 63]), "out of range for INT64")
        self.assertInvalid(request(datatype="UINT64", data=[1, 2 ** 64]), "out of range for UINT64")
        self.assertInvalid(request(datatype="BOOL", data=[1, 0]), "must hold true/false")
        self.assertInvalid(request(datatype="BYTES", data=["a", 1]), "BYTES 'data' must hold strings")
        del ok["data"]
        self.assertInvalid(request(), "exactly one of 'data', 'binary_data_size'")
        self.assertInvalid(request(data=[1, 2], parameters={"binary_data_size": 8}),
                           "sets 'data' and 'binary_data_size'")
        self.assertInvalid(request(parameters={"binary_data_size": -1}), "non-negative")
        self.assertInvalid(request(parameters={"binary_data_size": 8}), "only 0 bytes of binary data are left")
        head = request(parameters={"binary_data_size": 8})
        self.assertInvalid(head + b"\x00" * 12, "12 bytes of binary data", len(head))
        self.assertInvalid(head + b"\x00" * 4, "only 4 bytes", len(head))
        head = request(parameters={"binary_data_size": 4})
        self.assertInvalid(head + b"\x00" * 4, "binary_data_size 4, but INT32 [2] takes 8 bytes", len(head))
        self.assertInvalid(b"\x00" * 8, "raw binary request", 0)
        self.assertInvalid(b"", "empty")
        self.assertInvalid(b'{"inputs": [], "outputs": {}}', "'outputs'")
        self.assertInvalid(b'{"inputs": [], "outputs": [{"name": "o", "parameters": {"binary_data": "yes"}}]}',
                           "'binary_data'")
        self.assertInvalid(b'{"inputs": [], "outputs": [{"name": "o", "parameters": '
                           b'{"shared_memory_region": "r", "classification": 2}}]}', "'classification'")
        self.assertInvalid(b'{"inputs": [], "outputs": [{"name": "o", "parameters": '
                           b'{"shared_memory_region": "r", "binary_data": true}}]}', "'binary_data'")

    def test_parsed_request_serves_as_the_bytes_do_without_copying_binary_inputs(self):
        a, b = np.arange(5000, dtype=np.int32), np.arange(3, dtype=np.float32)
        body, json_length = generate([tensor("a", a, True), tensor("b", b, False)])
        frame = payload(body, json_length, "add", "7")
        request_bytes, options = restcodec.infer_request_from_http(frame)
        parsed, parsed_options = restcodec.parsed_request_from_http(frame)
        self.assertEqual(parsed_options, options)
        self.assertEqual(len(parsed), len(frame))
        self.assertIs(parse_request(parsed), parsed)
        self.assertEqual(parsed.message, parse_request(request_bytes).message)
        self.assertEqual((parsed.name, parsed.version), ("add", "7"))
        inputs = echo_model().decode(parsed).inputs
        np.testing.assert_array_equal(inputs["a"].as_numpy(), a)
        np.testing.assert_array_equal(inputs["b"].as_numpy(), b)
        self.assertTrue(np.shares_memory(inputs["a"].as_numpy(), np.frombuffer(frame, dtype=np.uint8)))
        self.assertFalse(inputs["a"].as_numpy().flags.writeable)
        mutable = bytearray(frame)  # read-only views even of a writable frame
        parsed, _ = restcodec.parsed_request_from_http(mutable)
        self.assertTrue(all(view.readonly for view in parsed.raw))

    def test_a_truncated_frame(self):
        with self.assertRaises(InferenceError) as caught:
            restcodec.infer_request_from_http(b"\x00\x05")
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)


class ResponseTests(SynchronousTestCase):
    def round_trip(self, arrays, outputs=None, binary_inputs=True, model=None, **kwargs):
        inputs = [tensor(name, array, binary_inputs) for name, array in arrays.items()]
        _, request_bytes, options = to_request(inputs, outputs, **kwargs)
        return to_result(serve(request_bytes, model), options)

    def test_every_datatype_back_through_tritonclient(self):
        for datatype in list(NUMERIC) + ["BYTES"]:
            array = sample(datatype)
            for binary in (False, True):
                result, body, json_length = self.round_trip(
                    {"y": array}, [httpclient.InferRequestedOutput("y", binary_data=binary)])
                got = result.as_numpy("y")
                if datatype == "BYTES":
                    expected = [[s.encode() for s in row] for row in array.tolist()]
                    self.assertEqual([[v if isinstance(v, bytes) else v.encode() for v in row]
                                      for row in got.tolist()], expected)
                else:
                    np.testing.assert_array_equal(got, array, err_msg="%s binary=%s" % (datatype, binary))
                entry = result.get_output("y")
                self.assertEqual((entry["datatype"], entry["shape"]), (datatype, [2, 3]))
                self.assertEqual("data" not in entry, binary)
                self.assertEqual(json_length == len(body), not binary)

    def test_json_document_is_tritons(self):
        model = Model(lambda r: {"sum": r["a"] + 1}, "add", version="3",
                      inputs=[("a", "INT32", [-1])], outputs=[("sum", "INT32", [-1])])
        result, body, json_length = self.round_trip(
            {"a": np.array([1, 2], dtype=np.int32)}, [httpclient.InferRequestedOutput("sum", binary_data=False)],
            model=model, request_id="abc")
        self.assertEqual(json.loads(body), {"id": "abc", "model_name": "add", "model_version": "3", "outputs": [
            {"name": "sum", "datatype": "INT32", "shape": [2], "data": [2, 3]}]})
        result, body, _ = self.round_trip({"a": np.array([1, 2], dtype=np.int32)}, model=model)
        self.assertNotIn("id", result.get_response())

    def test_mixed_binary_and_json_outputs_in_request_order(self):
        a, b, c = np.arange(4, dtype=np.int32), np.array([0.5], dtype=np.float32), np.arange(3, dtype=np.int64)
        outputs = [httpclient.InferRequestedOutput("c", binary_data=True),
                   httpclient.InferRequestedOutput("a", binary_data=False),
                   httpclient.InferRequestedOutput("b", binary_data=True)]
        result, body, json_length = self.round_trip({"a": a, "b": b, "c": c}, outputs)
        self.assertEqual([o["name"] for o in result.get_response()["outputs"]], ["c", "a", "b"])
        self.assertEqual(body[json_length:], c.tobytes() + b.tobytes())
        for name, array in (("a", a), ("b", b), ("c", c)):
            np.testing.assert_array_equal(result.as_numpy(name), array)

    def test_bytes_that_are_not_utf8_go_binary(self):
        array = np.array([b"ok", b"\xff\xfe"], dtype=object)
        result, body, json_length = self.round_trip(
            {"s": array}, [httpclient.InferRequestedOutput("s", binary_data=False)])
        self.assertEqual(result.get_output("s")["parameters"], {"binary_data_size": 4 + 2 + 4 + 2})
        self.assertEqual(result.as_numpy("s").tolist(), [b"ok", b"\xff\xfe"])
        self.assertLess(json_length, len(body))

    def test_parameters_and_empty_outputs(self):
        from anyserve_tw.worker.model import InferResponse

        model = Model(lambda r: InferResponse({"e": np.zeros((0, 2), dtype=np.float32)}, {"n": 2, "s": "x"}), "p")
        result, body, json_length = self.round_trip({"a": np.arange(1, dtype=np.int8)}, model=model)
        self.assertEqual(result.get_response()["parameters"], {"n": 2, "s": "x"})
        self.assertEqual(result.get_output("e")["parameters"], {"binary_data_size": 0})
        self.assertEqual(json_length, len(body))  # no binary bytes: all JSON, as Triton
        self.assertEqual(result.as_numpy("e").shape, (0, 2))

    def test_shared_memory_outputs_have_no_data(self):
        response = _v2.ModelInferResponse(model_name="m", outputs=[
            _v2.ModelInferResponse.InferOutputTensor(name="o", datatype="INT32", shape=[4]),
            _v2.ModelInferResponse.InferOutputTensor(name="p", datatype="INT32", shape=[1])])
        parts = protowire.raw_output_parts(response.SerializeToString(), [b"", b"\x07\x00\x00\x00"])
        options = restcodec.ResponseOptions(False, {"o": False, "p": False}, frozenset(["o"]))
        body_parts, json_length = restcodec.http_response_from_infer(parts, options)
        document = json.loads(b"".join(bytes(p) for p in body_parts))
        self.assertEqual(document["outputs"], [{"name": "o", "datatype": "INT32", "shape": [4]},
                                               {"name": "p", "datatype": "INT32", "shape": [1], "data": [7]}])

    def test_typed_contents_are_accepted(self):
        output = _v2.ModelInferResponse.InferOutputTensor(name="o", datatype="FP32", shape=[2])
        output.contents.fp32_contents.extend([1.5, -2])
        parts = [_v2.ModelInferResponse(model_name="m", outputs=[output]).SerializeToString()]
        for binary in (False, True):
            options = restcodec.ResponseOptions(binary, {}, frozenset())
            result, _, _ = to_result(parts, options)
            np.testing.assert_array_equal(result.as_numpy("o"), np.array([1.5, -2], dtype=np.float32))

    def test_binary_outputs_are_not_copied_and_parts_may_be_split_anywhere(self):
        big = np.arange(1 << 16, dtype=np.int32)
        response = _v2.ModelInferResponse(model_name="m", id="i", outputs=[
            _v2.ModelInferResponse.InferOutputTensor(name="o", datatype="INT32", shape=[1 << 16])])
        parts = protowire.raw_output_parts(response.SerializeToString(), [memoryview(big).cast("B")])
        options = restcodec.ResponseOptions(True, {}, frozenset())
        body_parts, json_length = restcodec.http_response_from_infer(parts, options)
        self.assertTrue(np.shares_memory(np.frombuffer(body_parts[1], dtype=np.int32), big))
        joined = b"".join(bytes(p) for p in parts)
        expected = b"".join(bytes(p) for p in body_parts)
        for cuts in ((1,), (3, 7), (len(joined) - 100,), tuple(range(1, len(joined), 4099))):
            pieces = [joined[a:b] for a, b in zip((0,) + cuts, cuts + (len(joined),))]
            body_parts, _ = restcodec.http_response_from_infer(pieces, options)
            self.assertEqual(b"".join(bytes(p) for p in body_parts), expected, cuts)

    def test_malformed_responses_are_internal(self):
        options = restcodec.ResponseOptions(False, {}, frozenset())
        good = _v2.ModelInferResponse(model_name="m", outputs=[
            _v2.ModelInferResponse.InferOutputTensor(name="o", datatype="INT32", shape=[2])]).SerializeToString()
        for parts in ([good[:-1]],
                      protowire.raw_output_parts(good, [b"\x00" * 4]),  # 4 bytes for INT32 [2]
                      protowire.raw_output_parts(good, [b"", b""])):  # two raw outputs for one output
            with self.assertRaises(InferenceError) as caught:
                restcodec.http_response_from_infer(parts, options)
            self.assertEqual(caught.exception.code, grpc.StatusCode.INTERNAL)
