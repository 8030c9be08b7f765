"""Tests for peek_request (anyserve_tw.wire.protowire):
routing fields without decoding."""
import grpc
from tritonclient.grpc import service_pb2 as triton

from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.wire.protowire import peek_request
from anyserve_tw.wire.protos import inference as ours


def varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field, wire_type):
    return varint(field << 3 | wire_type)


def string_field(field, value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tag(field, 2) + varint(len(value)) + value


def build_request(module, name="resnet", version="3", id="req-1", big=1 << 20):
    """A ModelInferRequest with parameters, two inputs, outputs and large raw contents."""
    request = module.ModelInferRequest(model_name=name, model_version=version, id=id)
    request.parameters["priority"].int64_param = 5
    request.parameters["note"].string_param = "model_name=other"
    for index, (tensor_name, size) in enumerate((("INPUT0", big), ("INPUT1", 300))):
        tensor = request.inputs.add(name=tensor_name, datatype="UINT8", shape=[size])
        tensor.parameters["binary_data_size"].int64_param = size
        request.raw_input_contents.append(bytes([index + 1]) * size)
    request.outputs.add(name="OUTPUT0")
    return request


class PeekRequestTests(SynchronousTestCase):
    """peek_request on well-formed requests from both message classes."""

    def assertPeek(self, data, expected):
        self.assertEqual(peek_request(data), expected)

    def test_ours(self):
        """Bytes from our ModelInferRequest class."""
        data = build_request(ours).SerializeToString()
        self.assertPeek(data, ("resnet", "3", "req-1"))

    def test_tritonclient(self):
        """Bytes from tritonclient's ModelInferRequest class."""
        data = build_request(triton).SerializeToString()
        self.assertPeek(data, ("resnet", "3", "req-1"))

    def test_tritonclient_infer_input(self):
        """A request built the way tritonclient's InferenceServerClient builds it."""
        import numpy as np
        import tritonclient.grpc as grpcclient

        infer_input = grpcclient.InferInput("x", [2, 1000], "FP32")
        infer_input.set_data_from_numpy(np.ones((2, 1000), dtype=np.float32))
        request = triton.ModelInferRequest(model_name="m", model_version="", id="")
        request.inputs.extend([infer_input._get_tensor()])
        request.raw_input_contents.extend([infer_input._get_content()])
        self.assertPeek(request.SerializeToString(), ("m", "", ""))

    def test_empty(self):
        """Empty bytes are a valid empty message."""
        self.assertPeek(b"", ("", "", ""))

    def test_only_name(self):
        """Missing version and id come back as ''."""
        data = ours.ModelInferRequest(model_name="only").SerializeToString()
        self.assertPeek(data, ("only", "", ""))

    def test_unicode(self):
        """Names are decoded as UTF-8."""
        data = triton.ModelInferRequest(
            model_name="mod\u00e8le", model_version="v\u2603", id="\U0001F600"
        ).SerializeToString()
        self.assertPeek(data, ("mod\u00e8le", "v\u2603", "\U0001F600"))

    def test_memoryview_and_bytearray(self):
        """Any buffer works, not only bytes."""
        data = build_request(ours, big=10).SerializeToString()
        self.assertPeek(memoryview(data), ("resnet", "3", "req-1"))
        self.assertPeek(bytearray(data), ("resnet", "3", "req-1"))

    def test_non_canonical_order(self):
        """Fields in any order: raw contents and inputs before the names."""
        full = build_request(triton, name="late", version="v10", id="x")
        parts = [
            triton.ModelInferRequest(raw_input_contents=full.raw_input_contents),
            triton.ModelInferRequest(id="x"),
            triton.ModelInferRequest(inputs=full.inputs),
            triton.ModelInferRequest(model_version="v10"),
            triton.ModelInferRequest(outputs=full.outputs),
            triton.ModelInferRequest(model_name="late"),
        ]
        data = b"".join(part.SerializeToString() for part in parts)
        # The concatenation is a valid message that protobuf itself agrees on.
        parsed = ours.ModelInferRequest.FromString(data)
        self.assertEqual((parsed.model_name, parsed.model_version, parsed.id), ("late", "v10", "x"))
        self.assertEqual(len(parsed.raw_input_contents), 2)
        self.assertPeek(data, ("late", "v10", "x"))

    def test_last_value_wins(self):
        """A field repeated at top level: the last occurrence wins, as in protobuf."""
        data = string_field(1, "first") + string_field(3, "a") + string_field(1, "second")
        self.assertEqual(ours.ModelInferRequest.FromString(data).model_name, "second")
        self.assertPeek(data, ("second", "", "a"))

    def test_unknown_fields_of_every_wire_type_skipped(self):
        """Unknown varint, fixed64, fixed32 and length-delimited fields are skipped."""
        data = (
            tag(20, 0) + varint(2**63)
            + tag(21, 1) + b"\x01" * 8
            + string_field(1, "m")
            + tag(22, 5) + b"\x02" * 4
            + tag(23, 2) + varint(3) + b"abc"
            + string_field(2, "7")
        )
        self.assertPeek(data, ("m", "7", ""))

    def test_nested_fields_not_mistaken(self):
        """An input tensor's name (field 1 nested in field 5) is not the model name."""
        request = triton.ModelInferRequest()
        request.inputs.add(name="tensor-name", datatype="BYTES", shape=[1])
        self.assertPeek(request.SerializeToString(), ("", "", ""))


class PeekErrorTests(SynchronousTestCase):
    """Malformed bytes raise INVALID_ARGUMENT, never anything else."""

    def assertInvalid(self, data):
        error = self.assertRaises(InferenceError, peek_request, data)
        self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT)
        return error

    def test_truncated_everywhere(self):
        """Every proper prefix cutting inside a field is rejected."""
        full = ours.ModelInferRequest(model_name="abc", model_version="1", id="zz")
        full.raw_input_contents.append(b"0123456789")
        data = full.SerializeToString()
        # Field boundaries: where a prefix is itself a complete message.
        boundaries = {0}
        pos = 0
        for part in (string_field(1, "abc"), string_field(2, "1"), string_field(3, "zz")):
            pos += len(part)
            boundaries.add(pos)
        boundaries.add(len(data))
        for cut in range(1, len(data)):
            if cut in boundaries:
                continue
            self.assertInvalid(data[:cut])

    def test_truncated_large_field(self):
        """A length prefix promising more bytes than present."""
        data = build_request(triton).SerializeToString()
        self.assertInvalid(data[:-1])
        self.assertInvalid(data[: len(data) // 2])

    def test_truncated_fixed(self):
        """A fixed64 or fixed32 field cut short."""
        self.assertInvalid(tag(9, 1) + b"\x00" * 7)
        self.assertInvalid(tag(9, 5) + b"\x00" * 3)

    def test_truncated_varint_tag(self):
        """A tag whose varint never ends."""
        self.assertInvalid(b"\x80")
        self.assertInvalid(string_field(1, "m") + b"\xff\xff")

    def test_truncated_varint_value(self):
        """A varint field value cut short."""
        self.assertInvalid(tag(9, 0) + b"\x80\x80")

    def test_varint_too_long(self):
        """A varint of more than 10 bytes."""
        self.assertInvalid(tag(9, 0) + b"\xff" * 11 + b"\x01")
        self.assertInvalid(b"\xff" * 12)

    def test_bad_length_varint(self):
        """A length prefix that is itself a malformed varint."""
        self.assertInvalid(tag(1, 2) + b"\xff" * 12)

    def test_invalid_utf8_name(self):
        """Invalid UTF-8 in model_name, model_version or id."""
        for field in (1, 2, 3):
            data = tag(field, 2) + varint(2) + b"\xff\xfe"
            error = self.assertInvalid(data)
            self.assertIn("malformed ModelInferRequest", error.message)

    def test_field_number_zero(self):
        """Field number 0 is not valid protobuf."""
        self.assertInvalid(tag(0, 2) + varint(1) + b"a")

    def test_group_and_reserved_wire_types(self):
        """Wire types 3, 4 (groups), 6 and 7 (undefined) are rejected."""
        # Each tail would be a valid value for some accepted wire type
        # (varint 0 or empty length-delimited, fixed32, fixed64).
        for wire_type in (3, 4, 6, 7):
            for tail in (b"\x00", b"\x00" * 4, b"\x00" * 8):
                error = self.assertInvalid(string_field(1, "m") + tag(9, wire_type) + tail)
                self.assertIn("malformed ModelInferRequest", error.message)
            self.assertInvalid(tag(1, wire_type))

    def test_garbage(self):
        """Random-looking bytes that are not a message."""
        self.assertInvalid(b"\x0a\x05ab")
        self.assertInvalid(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")


class SplitAndAppendTests(SynchronousTestCase):
    """The worker's zero-copy paths agree with protobuf's own parsing."""

    def test_split_raw_inputs(self):
        request = ours.ModelInferRequest(model_name="m", id="7")
        for name in ("a", "b"):
            tensor = request.inputs.add(name=name, datatype="UINT8")
            tensor.shape.append(3)
        request.raw_input_contents.extend([b"\x01\x02\x03", b"\x04\x05\x06"])
        from anyserve_tw.wire.protowire import split_raw_inputs

        rest, raw = split_raw_inputs(request.SerializeToString())
        self.assertEqual([bytes(r) for r in raw], [b"\x01\x02\x03", b"\x04\x05\x06"])
        self.assertTrue(all(isinstance(r, memoryview) for r in raw))
        parsed = ours.ModelInferRequest.FromString(rest)
        self.assertEqual(list(parsed.raw_input_contents), [])
        self.assertEqual([t.name for t in parsed.inputs], ["a", "b"])
        self.assertEqual(parsed.id, "7")

    def test_split_malformed_is_invalid_argument(self):
        from anyserve_tw.wire.protowire import split_raw_inputs

        with self.assertRaises(InferenceError) as caught:
            split_raw_inputs(b"\x3a\x10abc")
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)

    def test_raw_output_parts_parse_as_the_field(self):
        from anyserve_tw.wire.protowire import raw_output_parts

        head = ours.ModelInferResponse(model_name="m").SerializeToString()
        big = bytes(range(256)) * 1000  # length needs a multi-byte varint
        data = b"".join(raw_output_parts(head, [memoryview(b"xy"), big, b""]))
        for message_class in (ours.ModelInferResponse, triton.ModelInferResponse):
            parsed = message_class.FromString(data)
            self.assertEqual(parsed.model_name, "m")
            self.assertEqual(list(parsed.raw_output_contents), [b"xy", big, b""])

    def test_split_raw_inputs_read_only_over_mutable_buffer(self):
        """Raw input views stay read-only when the payload is a bytearray."""
        from anyserve_tw.wire.protowire import split_raw_inputs

        request = ours.ModelInferRequest(model_name="m")
        request.inputs.add(name="a", datatype="UINT8").shape.append(3)
        request.raw_input_contents.append(b"\x01\x02\x03")
        _, raw = split_raw_inputs(bytearray(request.SerializeToString()))
        self.assertEqual(bytes(raw[0]), b"\x01\x02\x03")
        self.assertTrue(raw[0].readonly)

    def test_raw_output_parts(self):
        """The parts hold the output buffers themselves and size non-byte
        views by their bytes."""
        import array

        from anyserve_tw.wire.protowire import raw_output_parts

        head = ours.ModelInferResponse(model_name="m").SerializeToString()
        big = bytes(range(256)) * 1000
        ints = memoryview(array.array("i", [1, 2, 3]))
        parts = raw_output_parts(head, [big, ints, b""])
        self.assertIs(parts[0], head)
        self.assertIs(parts[2], big)
        self.assertIs(parts[4], ints)
        self.assertEqual(len(parts), 6)  # the empty output is its key alone
        joined = b"".join(parts)
        parsed = ours.ModelInferResponse.FromString(joined)
        self.assertEqual(list(parsed.raw_output_contents), [big, ints.tobytes(), b""])
