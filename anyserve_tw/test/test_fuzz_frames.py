"""Fuzz tests of the frames between the ingress and its workers, both ends in
one process (issue 8): hostile bytes never raise out of ``dataReceived``,
never leave a request unanswered, and never grow a buffer past one frame.

A seeded generator (:class:`Mutator`), not hypothesis: it needs no new
dependency, runs for a time budget rather than an example count (CI has two
busy cores), and mutates real messages byte by byte, as a broken or hostile
peer would.  Every failure names its seed and iteration; ``ANYSERVE_FUZZ_SEED``
replays a seed and ``ANYSERVE_FUZZ_SECONDS`` scales each loop's budget for a
long local run.  ``tests/test_fuzz.py`` uses the same generator against real
processes.
"""
import collections
import json
import os
import random
import struct
import sys
import time

import grpc
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.statistics import InferenceStats
from anyserve_tw.ingress.workerlink import WorkerConnection
from anyserve_tw.wire import framing, payloads, protos, protowire
from anyserve_tw.test.fuzzapp import fuzz_app
from anyserve_tw.wire.errors import InferenceError

_v2 = protos.inference

# -- the generator (also used by tests/test_fuzz.py) ---------------------------


def fuzz_seed():
    """``ANYSERVE_FUZZ_SEED`` if set, else a fresh random seed."""
    value = os.environ.get("ANYSERVE_FUZZ_SEED")
    return int(value) if value else random.SystemRandom().randrange(2 ** 32)


def fuzz_seconds(default):
    """The time budget of one fuzz loop: ``ANYSERVE_FUZZ_SECONDS`` if set."""
    value = os.environ.get("ANYSERVE_FUZZ_SECONDS")
    return float(value) if value else default


class FuzzLoop:
    """Iterations of one fuzz loop: at least ``minimum``, then until ``seconds``
    have passed.  :meth:`context` says what replays a failure."""

    def __init__(self, name, seconds, minimum=50):
        self.name = name
        self.seed = fuzz_seed()
        self.rng = random.Random(self.seed)
        self.deadline = time.monotonic() + fuzz_seconds(seconds)
        self.minimum = minimum
        self.iteration = -1

    def __iter__(self):
        while self.iteration + 1 < self.minimum or time.monotonic() < self.deadline:
            self.iteration += 1
            yield self.iteration

    def context(self):
        return "fuzz %s: seed %d, iteration %d (replay: ANYSERVE_FUZZ_SEED=%d)" % (
            self.name, self.seed, self.iteration, self.seed)

    def report(self, outcomes=None):
        """Printed with every run, so that a CI log names the seed even when
        the process dies without a test failure; ``outcomes``: a Counter of
        what the iterations met, printed with it."""
        counted = "" if not outcomes else "; " + ", ".join(
            "%s %d" % item for item in sorted(outcomes.items(), key=str))
        sys.stderr.write("%s; %d iterations%s\n" % (self.context(), self.iteration + 1, counted))


#: Varints a decoder must refuse or survive: the largest 64-bit values, and
#: over-long encodings (10+ bytes, continuation bit never cleared).
HUGE_VARINTS = (
    protowire.encode_varint(2 ** 63 - 1), protowire.encode_varint(2 ** 64 - 1),
    protowire.encode_varint(2 ** 31), protowire.encode_varint(2 ** 32 - 1),
    b"\xff" * 10 + b"\x01", b"\x80" * 12, b"\xff" * 9,
)

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
             "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16", "", "int32", "FP8", "\x00")

#: Dimensions that break naive size arithmetic.
HUGE_DIMS = (2 ** 63 - 1, 2 ** 62, 2 ** 32, 2 ** 31 - 1, 2 ** 31, -1, -2, -(2 ** 63), 10 ** 9)


class Mutator:
    """Seeded mutations of bytes and of ModelInferRequests.  ``regions``:
    names of registered shared-memory regions of ``region_size`` bytes that
    requests name, with offsets and sizes in and out of range."""

    def __init__(self, rng, regions=(), region_size=0):
        self.rng = rng
        self.regions = tuple(regions)
        self.region_size = region_size

    def text(self, limit=12):
        rng = self.rng
        alphabet = "abcdefgh_-.0123456789\x00\u00e9\U0001f600/"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(limit)))

    def blob(self, limit=64):
        return self.rng.randbytes(self.rng.randrange(limit))

    def name(self, known):
        """One of ``known``, mostly; else a random or oversized string."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.75:
            return rng.choice(known)
        if roll < 0.95:
            return self.text()
        return "m" * rng.choice((257, 4096, 70000))

    def dims(self):
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            return [rng.randrange(5) for _ in range(rng.randrange(1, 3))]
        if roll < 0.9:
            return [rng.choice(HUGE_DIMS + (0, 1, 2)) for _ in range(rng.randrange(1, 4))]
        return [rng.randrange(3) for _ in range(rng.randrange(70))]  # too many dimensions

    def parameter(self, target):
        rng = self.rng
        which = rng.randrange(5)
        if which == 0:
            target.bool_param = rng.random() < 0.5
        elif which == 1:
            target.int64_param = rng.choice((0, 1, -1, 2 ** 63 - 1, -(2 ** 63), rng.randrange(100)))
        elif which == 2:
            target.string_param = self.text(40)
        elif which == 3:
            target.double_param = rng.choice((0.0, -1.5, 1e308, float("inf"), float("nan")))
        else:
            target.uint64_param = rng.choice((0, 1, 2 ** 64 - 1))

    def parameters(self, mapping):
        rng = self.rng
        keys = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset",
                "binary_data", "classification", "binary_data_size", "sequence_id", "priority",
                "timeout", "anyserve_worker")
        for _ in range(rng.choice((0, 0, 0, 1, 2, 3))):
            key = rng.choice(keys) if rng.random() < 0.7 else self.text()
            self.parameter(mapping[key])
        if self.regions and rng.random() < 0.2:  # a window of a registered region
            size = self.region_size
            mapping["shared_memory_region"].string_param = rng.choice(self.regions)
            for key in ("shared_memory_offset", "shared_memory_byte_size"):
                if rng.random() < 0.8:
                    mapping[key].int64_param = rng.choice(
                        (0, 4, 8, size - 4, size, size + 1, -1, 2 ** 62, rng.randrange(size + 8)))

    def contents(self, contents, datatype, count):
        rng = self.rng
        count = min(count, 64)
        if datatype == "BYTES":
            contents.bytes_contents.extend(self.blob(8) for _ in range(count))
        elif datatype == "BOOL":
            contents.bool_contents.extend(rng.random() < 0.5 for _ in range(count))
        elif datatype in ("FP32", "FP16"):
            contents.fp32_contents.extend(rng.uniform(-1e6, 1e6) for _ in range(count))
        elif datatype == "FP64":
            contents.fp64_contents.extend(rng.uniform(-1e6, 1e6) for _ in range(count))
        elif datatype in ("INT64",):
            contents.int64_contents.extend(rng.randrange(-2 ** 63, 2 ** 63) for _ in range(count))
        elif datatype in ("UINT64",):
            contents.uint64_contents.extend(rng.randrange(2 ** 64) for _ in range(count))
        elif datatype.startswith("UINT"):
            contents.uint_contents.extend(rng.randrange(2 ** 32) for _ in range(count))
        else:
            contents.int_contents.extend(rng.randrange(-2 ** 31, 2 ** 31) for _ in range(count))

    def infer_request(self, models=("add", "echo"), inputs=("a", "b")):
        """A ModelInferRequest that is well-formed protobuf but mostly wrong
        for the model: datatypes, shapes, contents, raw lengths, parameters."""
        rng = self.rng
        if rng.random() < 0.15:  # a correct request for add, for the paths that follow decoding
            message = _v2.ModelInferRequest(model_name="add", id=self.text())
            n = rng.randrange(1, 64)
            for name in ("a", "b"):
                message.inputs.add(name=name, datatype="INT32", shape=[n])
                message.raw_input_contents.append(rng.randbytes(4 * n))
            return message.SerializeToString()
        message = _v2.ModelInferRequest(model_name=self.name(models), id=self.text())
        if rng.random() < 0.1:
            message.model_version = rng.choice(("1", "v1", self.text()))
        self.parameters(message.parameters)
        raw = rng.random() < 0.7
        for _ in range(rng.choice((0, 1, 2, 2, 2, 3))):
            datatype = "INT32" if rng.random() < 0.6 else rng.choice(DATATYPES)
            shape = [rng.randrange(1, 5)] if rng.random() < 0.5 else self.dims()
            tensor = message.inputs.add(name=self.name(inputs), datatype=datatype, shape=shape)
            self.parameters(tensor.parameters)
            count = 1
            for d in shape:
                count = count * d if 0 <= d < 1000 else 1000
            if raw:
                size = count * 4 if rng.random() < 0.7 else rng.choice((0, 1, 3, 4097, count * 4 + 1))
                message.raw_input_contents.append(rng.randbytes(max(0, min(size, 1 << 16))))
            elif rng.random() < 0.8:
                self.contents(tensor.contents, datatype, count + rng.choice((0, 0, -1, 1)))
        if rng.random() < 0.1:  # raw contents for inputs that don't exist
            message.raw_input_contents.append(self.blob())
        for _ in range(rng.choice((0, 0, 1, 2))):
            output = message.outputs.add(name=self.name(("sum", "a", "b")))
            self.parameters(output.parameters)
        return message.SerializeToString()

    def mutate(self, data, rounds=None):
        """``data`` after 1-4 (or ``rounds``) random byte-level edits."""
        rng = self.rng
        data = bytearray(data)
        for _ in range(rounds if rounds is not None else rng.randrange(1, 5)):
            op = rng.randrange(9)
            at = rng.randrange(len(data) + 1)
            if op == 0 and data:  # flip bits
                for _ in range(rng.randrange(1, 4)):
                    i = rng.randrange(len(data))
                    data[i] ^= 1 << rng.randrange(8)
            elif op == 1:  # truncate
                del data[at:]
            elif op == 2:  # insert random bytes
                data[at:at] = self.blob(16)
            elif op == 3:  # delete a range
                del data[at:at + rng.randrange(1, 16)]
            elif op == 4:  # a huge or over-long varint
                data[at:at] = rng.choice(HUGE_VARINTS)
            elif op == 5 and data:  # an interesting byte
                data[rng.randrange(len(data))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01))
            elif op == 6:  # a whole extra field: any number, any wire type
                tag = protowire.encode_varint(rng.randrange(1, 40) << 3 | rng.randrange(8))
                value = rng.choice(HUGE_VARINTS + (b"\x05abc", b"\x00", b"\x7f" + bytes(4)))
                data[at:at] = tag + value
            elif op == 7 and data:  # duplicate a range
                start = rng.randrange(len(data))
                data[at:at] = data[start:start + rng.randrange(1, 64)]
            else:  # a length-delimited field whose length lies
                length = protowire.encode_varint(rng.choice((1 << 20, 2 ** 31, 2 ** 32 + 5, 0)))
                data[at:at] = bytes([rng.choice((1, 2, 3, 4, 5, 6, 7)) << 3 | 2]) + length
        return bytes(data)

    def infer_bytes(self, models=("add", "echo"), inputs=("a", "b")):
        """Request bytes: a structured request, mutated two times in three."""
        rng = self.rng
        data = self.infer_request(models, inputs)
        if rng.random() < 0.66:
            data = self.mutate(data)
        return data

    def json_body(self, models=("add", "echo")):
        """A REST inference body: JSON that is mostly wrong for the model, or
        mutated bytes of it."""
        rng = self.rng
        body = {"inputs": []}
        if rng.random() < 0.2:
            body["id"] = rng.choice((self.text(), 5, None, [1]))
        for name in rng.choice((("a", "b"), ("a",), (), ("a", "b", "c"))):
            shape = [rng.randrange(1, 4)] if rng.random() < 0.6 else self.dims()
            count = shape[0] if len(shape) == 1 and 0 <= shape[0] < 100 else rng.randrange(4)
            tensor = {"name": name, "datatype": "INT32" if rng.random() < 0.6 else rng.choice(DATATYPES),
                      "shape": shape,
                      "data": [rng.choice((1, -7, 2 ** 40, 1.5, "x", None, True, [1, 2]))
                               if rng.random() < 0.2 else rng.randrange(100) for _ in range(count)]}
            for key in ("datatype", "shape", "data", "name"):
                if rng.random() < 0.05:
                    del tensor[key]
            if rng.random() < 0.1:
                tensor["parameters"] = {rng.choice(("binary_data_size", "shared_memory_region",
                                                    "binary_data")): rng.choice((4, -1, "r", True, 2 ** 70))}
            body["inputs"].append(tensor)
        if rng.random() < 0.2:
            body["outputs"] = [{"name": rng.choice(("sum", "x")),
                                "parameters": {"binary_data": rng.random() < 0.5}}]
        if rng.random() < 0.15:
            body["parameters"] = {self.text(): rng.choice((1, "x", None, {"a": 1}))}
        if rng.random() < 0.05:
            body = rng.choice(([], "x", 1, None, {"inputs": {}}, {"inputs": [1, 2]}))
        # \u escapes: a mutation that splits an escaped pair makes a lone
        # surrogate (LoneSurrogateInJson).
        data = json.dumps(body).encode("ascii")
        if rng.random() < 0.5:
            data = self.mutate(data)
        return data


# -- helpers -------------------------------------------------------------------


def grpc_code_name(number):
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return "code %d" % number


class FakeReactor(MemoryReactorClock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def held(decoder):
    """Bytes a FrameDecoder holds, counted from its chunks rather than its
    own counter: what a hostile stream could make it accumulate."""
    chunks = list(decoder._chunks)
    return sum(len(c) for c in chunks) - (decoder._offset if chunks else 0)


def chunked(rng, data):
    """``data`` cut at random points, as a socket may deliver it."""
    pieces = []
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 2, 7, 19, 20, 21, 64, 1000, 1 << 16))
        pieces.append(data[pos:pos + step])
        pos += step
    return pieces


class LogFailures:
    """Log events that carry a failure, while installed: trial would fail
    the test on any of them, so each test says which are expected."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        if "log_failure" in event:
            self.events.append(event)

    def unexpected(self, *allowed_prefixes):
        return [e for e in self.events
                if not str(e.get("log_format", "")).startswith(allowed_prefixes)]


def frames_of(data):
    return [(kind, rid, aux, bytes(payload)) for kind, rid, aux, payload in
            framing.FrameDecoder().feed(data)]


# -- FrameDecoder ----------------------------------------------------------------


class FrameDecoderFuzz(SynchronousTestCase):
    def random_stream(self, rng, mutator, max_payload):
        """Frames (some oversize, some large enough to be filled in place)
        and the (kind, id, aux, payload) or oversize notice each should give."""
        data, expected = [], []
        for request_id in range(rng.randrange(1, 12)):
            kind = rng.randrange(256)
            aux = rng.randrange(2 ** 32)
            roll = rng.random()
            if roll < 0.1:
                length = rng.randrange(max_payload + 1, max_payload * 3)
                data.append(framing.encode_header(kind, request_id, length, aux) + bytes(length))
                expected.append(("oversize", kind, request_id, length))
                continue
            payload = rng.randbytes(rng.choice((0, 1, 19, 100, max_payload)) if roll < 0.5
                                    else rng.randrange(max_payload + 1))
            data.append(framing.encode_frame(kind, request_id, payload, aux))
            expected.append((kind, request_id, aux, payload))
        return b"".join(data), expected

    def test_any_split_gives_the_same_frames(self):
        """Frames cut anywhere decode as whole ones, oversize ones are
        skipped, and the decoder never holds more than one frame."""
        loop = FuzzLoop("frame decoder", 1.0)
        mutator = Mutator(loop.rng)
        max_payload, large = 2048, 256
        for _ in loop:
            data, expected = self.random_stream(loop.rng, mutator, max_payload)
            decoder = framing.FrameDecoder(max_payload, large=large)
            got = []
            for piece in chunked(loop.rng, data):
                for item in decoder.feed(piece):
                    got.append(item if item[0] == "oversize" else item[:3] + (bytes(item[3]),))
                self.assertLess(held(decoder), framing.HEADER_SIZE + max_payload, loop.context())
            self.assertEqual(got, expected, loop.context())
            self.assertEqual(decoder.expecting, 0, loop.context())
        loop.report()

    def test_random_bytes_never_raise(self):
        """Garbage (random headers claiming up to 4 GiB) neither raises nor
        is buffered past one frame's cap."""
        loop = FuzzLoop("frame decoder garbage", 1.0)
        max_payload = 4096
        for _ in loop:
            decoder = framing.FrameDecoder(max_payload, large=512)
            data = loop.rng.randbytes(loop.rng.randrange(20, 20000))
            for piece in chunked(loop.rng, data):
                for item in decoder.feed(piece):
                    if item[0] != "oversize":
                        self.assertLessEqual(len(item[3]), max_payload, loop.context())
                self.assertLess(held(decoder), framing.HEADER_SIZE + max_payload, loop.context())
        loop.report()


# -- what the ingress reads of a request ------------------------------------------


class ProtowireFuzz(SynchronousTestCase):
    def test_mutated_requests_are_invalid_argument_or_parsed(self):
        """The ingress's ``peek_request`` and the worker's
        ``split_raw_inputs`` raise nothing but INVALID_ARGUMENT, and agree
        with protobuf on every request protobuf itself accepts."""
        loop = FuzzLoop("protowire", 1.0)
        mutator = Mutator(loop.rng)
        for _ in loop:
            data = mutator.infer_bytes()
            try:
                name, version, request_id = protowire.peek_request(data)
            except InferenceError as e:
                self.assertEqual(e.code, grpc.StatusCode.INVALID_ARGUMENT, loop.context())
                name = None
            try:
                rest, raw = protowire.split_raw_inputs(data)
            except InferenceError as e:
                self.assertEqual(e.code, grpc.StatusCode.INVALID_ARGUMENT, loop.context())
                raw = None
            message = _v2.ModelInferRequest()
            try:
                message.ParseFromString(data)
            except Exception:
                continue
            # Protobuf took it: the ingress must route it the same way.
            if name is not None:
                self.assertEqual((name, version, request_id),
                                 (message.model_name, message.model_version, message.id),
                                 loop.context())
            if raw is not None:
                self.assertEqual([bytes(r) for r in raw], list(message.raw_input_contents),
                                 loop.context())
        loop.report()


# -- the worker's end -------------------------------------------------------------


def shared_memory_region(testcase, size):
    """A POSIX shared-memory object of ``size`` bytes, gone after the test."""
    from multiprocessing import shared_memory

    region = shared_memory.SharedMemory(create=True, size=size)

    def remove():
        region.close()
        region.unlink()

    testcase.addCleanup(remove)
    return region




MODELS = ("add", "echo", "now", "count")

#: What the worker may log with a traceback: a SHM_TABLE it could not read.
EXPECTED_WORKER_FAILURES = ("malformed shared-memory table",)


class WorkerConnectionUnderTest:
    """A WorkerProtocol over a StringTransport, and what it wrote back."""

    def __init__(self, execution):
        from anyserve_tw.worker.protocol import WorkerProtocol

        self.protocol = WorkerProtocol(execution)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.decoder = framing.FrameDecoder(max_payload=2 ** 32)
        self.received = []

    def written(self):
        data = self.transport.value()
        self.transport.clear()
        frames = [(k, r, a, bytes(p)) for k, r, a, p in self.decoder.feed(data)]
        self.received.extend(frames)
        return frames


class WorkerProtocolFuzz(SynchronousTestCase):
    def setUp(self):
        from anyserve_tw.test.test_execution import QueuedPool
        from anyserve_tw.worker.execution import Execution

        self.reactor = FakeReactor()
        self.pool = QueuedPool()
        self.max_payload = 8192
        self.execution = Execution(self.reactor, fuzz_app(), self.pool, max_payload=self.max_payload)
        self.logged = LogFailures(self)

    def assertOnlyExpectedFailuresLogged(self, loop):
        unexpected = self.logged.unexpected(*EXPECTED_WORKER_FAILURES)
        self.flushLoggedErrors()
        self.assertEqual(
            [(e.get("log_format"), e["log_failure"].getTraceback()) for e in unexpected[:3]], [],
            loop.context())

    def request_frame(self, loop, mutator, request_id):
        rng = loop.rng
        kind = rng.choice((framing.REQUEST, framing.REQUEST, framing.STREAM_REQUEST,
                           framing.HTTP_REQUEST))
        if kind == framing.HTTP_REQUEST:
            body = mutator.json_body(MODELS)
            json_length = None if rng.random() < 0.7 else rng.choice((0, len(body), len(body) + 1, 2 ** 31))
            name = mutator.name(MODELS)[:4000]  # a URL path segment: HTTP caps request lines
            payload = b"".join(payloads.http_request_parts(name, "", body, json_length))
            if rng.random() < 0.2:
                payload = mutator.mutate(payload)
        else:
            payload = mutator.infer_bytes(MODELS)
        aux = rng.choice((0, 0, 0, 1, 50, 2 ** 32 - 1))
        return framing.encode_frame(kind, request_id, payload, aux)

    def test_hostile_requests_are_each_answered_once(self):
        """Mutated requests in well-formed frames, with CANCELs and SHM
        tables among them: each request is answered exactly once (RESPONSE
        or ERROR with a known status) unless cancelled first, nothing stays
        in flight, and nothing raises out of the protocol."""
        loop = FuzzLoop("worker protocol", 2.5)
        region = shared_memory_region(self, 4096)
        table = payloads.encode_shm_table({"fuzz": payloads.Region("/" + region.name, 0, region.size)})
        mutator = Mutator(loop.rng, regions=("fuzz",), region_size=region.size)
        rng = loop.rng
        connection = WorkerConnectionUnderTest(self.execution)
        protocol = connection.protocol
        protocol.dataReceived(framing.encode_frame(framing.SHM_TABLE, 0, table))
        codes = {code.value[0] for code in grpc.StatusCode}
        next_id = 1
        cancelled, sent = set(), set()
        for _ in loop:
            frames = []
            for _ in range(rng.randrange(1, 6)):
                roll = rng.random()
                if roll < 0.1 and protocol.inflight:
                    victim = rng.choice(sorted(protocol.inflight))
                    cancelled.add(victim)
                    frames.append(framing.encode_frame(framing.CANCEL, victim))
                elif roll < 0.13:
                    frames.append(framing.encode_frame(framing.CANCEL, rng.randrange(2 ** 64)))
                elif roll < 0.16:  # another table, or a broken one: the region may be gone
                    other = payloads.encode_shm_table({mutator.text(): payloads.Region(
                        "/anyserve-fuzz-none", rng.randrange(100), rng.randrange(100))})
                    frames.append(framing.encode_frame(framing.SHM_TABLE, 0, mutator.mutate(other)
                                                       if rng.random() < 0.5 else other))
                elif roll < 0.2:  # the real region back
                    frames.append(framing.encode_frame(framing.SHM_TABLE, 0, table))
                else:
                    frames.append(self.request_frame(loop, mutator, next_id))
                    sent.add(next_id)
                    next_id += 1
            for piece in chunked(rng, b"".join(frames)):
                protocol.dataReceived(piece)
                self.assertLess(held(protocol._decoder), framing.HEADER_SIZE + self.max_payload,
                                loop.context())
            self.pool.run(rng.randrange(len(self.pool.queue) + 1))
            self.reactor.advance(rng.choice((0, 0, 0.01, 0.1)))
            connection.written()
        # Let everything finish: every thread job, every timeout.
        for _ in range(10):
            self.pool.run()
            self.reactor.advance(1.0)
        self.pool.run()
        self.reactor.advance(2 ** 33)  # the longest frame timeout
        connection.written()

        finals = {}
        for kind, request_id, aux, payload in connection.received:
            self.assertIn(kind, (framing.RESPONSE, framing.ERROR, framing.PARTIAL, framing.TIMING),
                          loop.context())
            self.assertIn(request_id, sent, loop.context())
            if kind in (framing.RESPONSE, framing.ERROR):
                self.assertNotIn(request_id, finals, "two answers to %d; %s" % (request_id, loop.context()))
                finals[request_id] = (kind, aux, payload)
            if kind == framing.ERROR:
                self.assertIn(aux, codes, loop.context())
                self.assertNotEqual(payload, b"worker failed to answer", loop.context())
            if kind == framing.TIMING:
                payloads.Timing.unpack(payload)
        outcomes = collections.Counter(
            "OK" if kind == framing.RESPONSE else grpc_code_name(aux) for kind, aux, _ in finals.values())
        loop.report(outcomes)
        # Not a degenerate run: some requests got through, some were refused.
        self.assertTrue(outcomes["OK"] and outcomes["INVALID_ARGUMENT"], (outcomes, loop.context()))
        unanswered = sent - set(finals) - cancelled
        self.assertEqual(unanswered, set(), loop.context())
        self.assertEqual(protocol.inflight, {}, loop.context())
        self.assertEqual(self.execution.pending, 0, loop.context())
        self.assertOnlyExpectedFailuresLogged(loop)
        # Still serving: a correct request after all that.
        good = _v2.ModelInferRequest(model_name="now").SerializeToString()
        protocol.dataReceived(framing.encode_frame(framing.REQUEST, next_id, good))
        [(kind, request_id, _, _)] = [f for f in connection.written() if f[0] != framing.TIMING]
        self.assertEqual((kind, request_id), (framing.RESPONSE, next_id), loop.context())

    def test_hostile_framing_only_drops_the_connection(self):
        """Random kinds, ids, lengths (up to 4 GiB), flags and truncated
        headers: nothing raises out of ``dataReceived``, nothing buffers
        past one frame, and the worker still answers a good request on a
        fresh connection."""
        loop = FuzzLoop("worker framing", 2.0)
        mutator = Mutator(loop.rng)
        rng = loop.rng
        for _ in loop:
            connection = WorkerConnectionUnderTest(self.execution)
            protocol = connection.protocol
            frames = []
            for request_id in range(rng.randrange(1, 6)):
                frame = self.request_frame(loop, mutator, rng.choice((request_id, 0, 2 ** 64 - 1)))
                if rng.random() < 0.5:
                    frame = mutator.mutate(frame, rounds=1)
                if rng.random() < 0.3:  # another kind, flags, reserved bits
                    header = bytearray(frame[:framing.HEADER_SIZE].ljust(framing.HEADER_SIZE, b"\0"))
                    header[rng.choice((4, 5, 6, 7))] = rng.randrange(256)
                    frame = bytes(header) + frame[framing.HEADER_SIZE:]
                if rng.random() < 0.1:  # a length far past the cap
                    frame = struct.pack("!I", rng.choice((self.max_payload + 1, 2 ** 32 - 1))) + frame[4:]
                frames.append(frame)
            for piece in chunked(rng, b"".join(frames)):
                protocol.dataReceived(piece)
                self.assertLess(held(protocol._decoder), framing.HEADER_SIZE + self.max_payload,
                                loop.context())
            self.pool.run()
            self.reactor.advance(rng.choice((0, 1, 60)))
            protocol.connectionLost(None)
            self.pool.run()
            connection.written()
        self.reactor.advance(2 ** 33)
        self.pool.run()
        loop.report()
        self.assertEqual(self.execution.pending, 0, loop.context())
        self.assertOnlyExpectedFailuresLogged(loop)
        connection = WorkerConnectionUnderTest(self.execution)
        good = _v2.ModelInferRequest(model_name="now").SerializeToString()
        connection.protocol.dataReceived(framing.encode_frame(framing.REQUEST, 1, good))
        self.assertIn((framing.RESPONSE, 1), [f[:2] for f in connection.written()], loop.context())


# -- the ingress's end -------------------------------------------------------------


class RecordingListener:
    """What the router's per-request listener does with a worker's TIMING
    and PARTIAL frames: the model's real statistics, and the partials kept."""

    def __init__(self, stats):
        self.stats = stats
        self.partials = 0

    def timing(self, timing):
        self.stats.timing(timing)

    def partial(self, payload):
        self.partials += 1


class IngressWorkerLinkFuzz(SynchronousTestCase):
    """A worker that sends garbage: the ingress fails the requests it can
    tell apart, drops the connection when it can't, and buffers no more than
    one frame."""

    def test_hostile_worker_frames(self):
        from anyserve_tw.test.test_workerlink import ClosingTransport, FakeHandle

        loop = FuzzLoop("ingress worker link", 1.5)
        mutator = Mutator(loop.rng)
        rng = loop.rng
        max_payload = 8192
        valid_timing = payloads.Timing(1, 2, 3, 4, 1).pack()
        for _ in loop:
            clock = FakeReactor()
            handle = FakeHandle()
            transport = ClosingTransport(clock)
            connection = WorkerConnection(handle, max_payload)
            transport.protocol = connection
            connection.makeConnection(transport)
            stats = InferenceStats()
            outcomes = {}
            deferreds = {}
            for _ in range(rng.randrange(1, 8)):
                kind = rng.choice(framing.REQUEST_KINDS)
                listener = RecordingListener(stats) if rng.random() < 0.8 else None
                d = connection.forward(b"x", rng.choice((None, 1.0)), kind, listener)
                request_id = max(connection._pending)
                deferreds[request_id] = d
                d.addBoth(lambda result, request_id=request_id: outcomes.setdefault(request_id, []).append(result))
            ids = sorted(deferreds)
            frames = []
            for _ in range(rng.randrange(1, 12)):
                kind = rng.choice((framing.RESPONSE, framing.ERROR, framing.TIMING, framing.TIMING,
                                   framing.PARTIAL, rng.randrange(256)))
                request_id = rng.choice(ids) if rng.random() < 0.8 else rng.randrange(2 ** 64)
                if kind == framing.TIMING and rng.random() < 0.6:
                    payload = valid_timing if rng.random() < 0.5 else struct.pack(
                        "!QQQQI", *(rng.choice((0, 1, 2 ** 56, rng.randrange(2 ** 56))) for _ in range(4)),
                        rng.choice((0, 1, 2, 2 ** 32 - 1, rng.randrange(2 ** 32))))
                elif kind == framing.ERROR and rng.random() < 0.5:
                    payload = rng.randbytes(rng.randrange(40))  # not UTF-8
                else:
                    payload = mutator.mutate(valid_timing) if rng.random() < 0.3 else mutator.blob(200)
                aux = rng.choice((0, 1, 2, 16, 17, 99, 2 ** 32 - 1))
                frame = framing.encode_frame(kind, request_id, payload, aux)
                if rng.random() < 0.1:
                    frame = struct.pack("!I", rng.choice((max_payload + 1, 2 ** 32 - 1))) + frame[4:]
                if rng.random() < 0.1:
                    frame = mutator.mutate(frame, rounds=1)
                frames.append(frame)
            for piece in chunked(rng, b"".join(frames)):
                if connection.transport.disconnected or not transport.connected and transport.lost_scheduled:
                    break
                connection.dataReceived(piece)
                self.assertLess(held(connection._decoder), framing.HEADER_SIZE + max_payload,
                                loop.context())
            clock.advance(0)
            if not transport.lost_scheduled:
                transport.peer_closes()
            clock.advance(0)
            # Every request is over: answered, failed or failed by the drop.
            self.assertEqual(sorted(outcomes), ids, loop.context())
            for request_id, results in outcomes.items():
                self.assertEqual(len(results), 1, loop.context())
                result = results[0]
                if hasattr(result, "check"):
                    self.assertTrue(result.check(InferenceError), (result, loop.context()))
                    result.value.code  # a grpc.StatusCode, even for unheard-of numbers
                    self.assertIsInstance(result.value.code, grpc.StatusCode, loop.context())
            self.assertEqual(handle.lost, [connection], loop.context())
            # (Whether its statistics still build: InferenceStatsFromHostileTimings.)
        loop.report()


class InferenceStatsFromHostileTimings(SynchronousTestCase):
    """What the worker-link fuzz found: TIMING frames are trusted as sent.
    Fixed in anyserve_tw/ingress/statistics.py."""

    def setUp(self):
        from anyserve_tw.test.test_workerlink import ClosingTransport, FakeHandle

        clock = FakeReactor()
        transport = ClosingTransport(clock)
        self.connection = WorkerConnection(FakeHandle(), 8192)
        transport.protocol = self.connection
        self.connection.makeConnection(transport)
        self.stats = InferenceStats()
        self.connection.forward(b"x", None, framing.REQUEST, RecordingListener(self.stats))


    def test_huge_timings_keep_statistics_readable(self):
        """Two TIMING frames of 2**63 ns each overflow the uint64 sums, and
        ModelStatistics for that model raises ValueError from then on."""
        huge = payloads.Timing(2 ** 63, 2 ** 63, 2 ** 63, 2 ** 63, 1).pack()
        self.connection.dataReceived(framing.encode_frame(framing.TIMING, 1, huge) * 2)
        self.stats.to_proto("m", "1")


    def test_timings_cannot_grow_the_batch_table(self):
        """Each TIMING frame of one request in flight may name a new batch
        size: 10,000 frames make 10,000 batch_stats entries, kept forever."""
        self.connection.dataReceived(b"".join(
            framing.encode_frame(framing.TIMING, 1, payloads.Timing(1, 1, 1, 1, size).pack())
            for size in range(1, 10001)))
        self.assertLessEqual(len(self.stats.batches), 1024)



class LoneSurrogateInJson(SynchronousTestCase):
    """What the worker-protocol fuzz found: a JSON string with a lone
    surrogate escape (``"\\ud800"``, e.g. half of an escaped emoji) decodes
    to a ``str`` that protobuf cannot hold, and the worker answers INTERNAL
    "unexpected error" with a traceback logged for each such request; now
    INVALID_ARGUMENT (anyserve_tw/worker/restcodec.py).  (tests/test_fuzz.py
    has the ingress's own JSON endpoints' twin.)"""

    def test_lone_surrogate_is_invalid_argument(self):
        from anyserve_tw.test.test_execution import QueuedPool
        from anyserve_tw.worker.execution import Execution

        execution = Execution(FakeReactor(), fuzz_app(), QueuedPool())
        logged = LogFailures(self)
        for body in (b'{"inputs": [], "parameters": {"\\ud800": 1}}',
                     b'{"inputs": [], "parameters": {"a": "\\ud800"}}',
                     b'{"id": "\\ud800", "inputs": []}',
                     b'{"inputs": [{"name": "\\ud800", "datatype": "INT32", "shape": [1], "data": [1]}]}'):
            payload = b"".join(payloads.http_request_parts("echo", "", body))
            answer = self.successResultOf(execution.execute(payload, kind=framing.HTTP_REQUEST))
            self.assertEqual((answer.kind, answer.code),
                             (framing.ERROR, grpc.StatusCode.INVALID_ARGUMENT.value[0]), body)
        self.assertEqual(logged.events, [])


class NulInSharedMemoryKey(SynchronousTestCase):
    """What the inference-API fuzz (tests/test_fuzz.py) found: a
    SystemSharedMemoryRegister whose key holds a NUL byte reaches
    ``os.open``, whose ValueError ("embedded null byte") is INTERNAL
    "unexpected error" with a traceback logged per request; now the
    invalid-key INVALID_ARGUMENT, as for a slash (in both processes)."""

    def test_nul_in_key_is_invalid_argument(self):
        from anyserve_tw.ingress.sharedmemory import SharedMemoryRegistry

        regions = SharedMemoryRegistry()
        with self.assertRaises(InferenceError) as caught:
            regions.register("r", "/anyserve\0fuzz", 0, 4)
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
