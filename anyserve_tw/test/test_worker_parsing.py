"""Tests for anyserve_tw.worker.parsing: one parse of a request's bytes serves
routing and decoding, and raw inputs stay in the frame, read-only."""
import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos, protowire
from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.worker.app import AnyServe
from anyserve_tw.worker.parsing import ParsedRequest, parse_request

_v2 = protos.inference


def field(number, wire_type, value):
    """One top-level field: tag, then the value (length-prefixed if wire type 2)."""
    key = protowire.encode_varint(number << 3 | wire_type)
    if wire_type == protowire.LENGTH_DELIMITED:
        return key + protowire.encode_varint(len(value)) + value
    return key + value


def request(n=4, **fields):
    message = _v2.ModelInferRequest(model_name="add", model_version="2", id="r1", **fields)
    for name in ("a", "b"):
        message.inputs.add(name=name, datatype="INT32", shape=[n])
        message.raw_input_contents.append(np.arange(n, dtype="<i4").tobytes())
    return message


class ParseTests(SynchronousTestCase):
    def assertSameMessage(self, parsed, expected):
        expected = _v2.ModelInferRequest.FromString(expected.SerializeToString())
        raw = list(expected.raw_input_contents)
        del expected.raw_input_contents[:]
        self.assertEqual(parsed.message, expected)
        self.assertEqual([bytes(r) for r in parsed.raw], raw)

    def test_fields_and_raw_inputs(self):
        message = request(parameters={"p": _v2.InferParameter(int64_param=3)})
        parsed = parse_request(message.SerializeToString())
        self.assertEqual((parsed.name, parsed.version), ("add", "2"))
        self.assertSameMessage(parsed, message)
        self.assertEqual(list(parsed.message.raw_input_contents), [])

    def test_any_payload_type_and_any_field_order(self):
        """Raw inputs first, in the middle, last; payload as bytes, bytearray
        or memoryview (the frame reader may hand over any of them)."""
        message = request()
        name, inputs = field(1, 2, b"add"), b"".join(
            field(5, 2, t.SerializeToString()) for t in message.inputs)
        raw = [field(7, 2, r) for r in message.raw_input_contents]
        version, rid = field(2, 2, b"2"), field(3, 2, b"r1")
        orders = [
            raw[0] + name + version + raw[1] + rid + inputs,
            name + version + rid + inputs + raw[0] + raw[1],
            raw[0] + raw[1] + name + version + rid + inputs,
        ]
        for data in orders:
            for payload in (data, bytearray(data), memoryview(data)):
                self.assertSameMessage(parse_request(payload), message)

    def test_raw_inputs_are_read_only_views_of_the_frame(self):
        frame = bytearray(request(n=1000).SerializeToString())
        parsed = parse_request(frame)
        array = np.frombuffer(parsed.raw[1], dtype="<i4")
        self.assertTrue(np.shares_memory(array, np.frombuffer(frame, dtype=np.uint8)))
        self.assertFalse(array.flags.writeable)
        self.assertTrue(all(view.readonly for view in parsed.raw))

    def test_no_raw_inputs(self):
        message = _v2.ModelInferRequest(model_name="m")
        message.inputs.add(name="x", datatype="INT32", shape=[1]).contents.int_contents.append(5)
        parsed = parse_request(message.SerializeToString())
        self.assertEqual(parsed.raw, [])
        self.assertEqual(parsed.message, message)

    def test_long_varints_and_unknown_fields_are_kept_for_protobuf(self):
        """Multi-byte tags and lengths, fixed-width and varint fields pass
        through to protobuf, which keeps unknown ones."""
        big = np.arange(100, dtype="<i4").tobytes()  # 400 bytes: a 2-byte length
        data = (field(1, 2, b"m") + field(300, 0, b"\x96\x01") + field(7, 2, big)
                + field(301, 1, b"\x00" * 8) + field(302, 5, b"\x00" * 4))
        parsed = parse_request(data)
        self.assertEqual(parsed.name, "m")
        self.assertEqual([bytes(r) for r in parsed.raw], [big])
        self.assertEqual(parsed.message.SerializeToString(), data.replace(field(7, 2, big), b""))

    def test_parsed_request_passes_through(self):
        parsed = parse_request(request().SerializeToString())
        self.assertIs(parse_request(parsed), parsed)

    def test_malformed(self):
        for data in (
            b"\x0a\x05ab",  # length runs past the end
            b"\xff\xff\xff",  # truncated varint tag
            b"\x00\x01",  # field number 0
            b"\x0b\x01",  # wire type 3 (groups)
            b"\x08",  # varint value missing
            b"\x3a\x10" + b"\x00" * 3,  # raw input runs past the end
            b"\x0a\x02\xff\xfe",  # model name not UTF-8
            b"\x2a\x02\xff\xff",  # an input that is not an InferInputTensor
        ):
            error = self.assertRaises(InferenceError, parse_request, data)
            self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT, data)
            self.assertIn("malformed", error.message)


class ParseOnceTests(SynchronousTestCase):
    def test_route_and_decode_share_one_parse(self):
        """AnyServe.route takes the worker's ParsedRequest, and the model
        decodes from it without walking the bytes again."""
        app = AnyServe()
        app.model("add", version="2")(lambda request: {"sum": request["a"] + request["b"]})
        parsed = parse_request(request().SerializeToString())
        walks = []
        from anyserve_tw.worker import parsing

        original = parsing.split_raw_inputs
        self.patch(parsing, "split_raw_inputs", lambda view: walks.append(1) or original(view))
        model = app.route(parsed)
        decoded = model.decode(parsed)
        self.assertEqual(walks, [])
        self.assertIsInstance(parsed, ParsedRequest)
        self.assertEqual(decoded["b"].tolist(), [0, 1, 2, 3])
        self.assertEqual(decoded.model_version, "2")
