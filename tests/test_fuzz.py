"""Fuzz tests against real processes (issue 8): mutated ModelInferRequest
bytes over gRPC, mutated JSON bodies over REST and mutated management
requests, each into a real ingress (twistd) and its supervised worker.

Every call must end in a response or a status before its deadline (a call
that reaches :data:`DEADLINE` counts as a hang); afterwards a correct ``add``
still succeeds, the server is live, the worker was not restarted (same pid),
nothing was logged as an unhandled error, and the ingress's RSS grew by less
than :data:`RSS_GROWTH_LIMIT` (plus 2% of what was sent) from the end of a warm-up to the end of the run.

The generator is :class:`anyserve_tw.test.test_fuzz_frames.Mutator`, seeded:
a failure names its seed (replay with ``ANYSERVE_FUZZ_SEED``); each loop runs
for a few seconds (``ANYSERVE_FUZZ_SECONDS`` sets it for a long local run).
"""
import collections
import http.client
import json
import os
import socket
import urllib.parse
import zlib

import grpc
import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.test.test_fuzz_frames import FuzzLoop, Mutator, shared_memory_region
from anyserve_tw.wire import protos
from tests.harness import Ingress, ROOT, infer_inputs, rss_bytes

_v2 = protos.inference
_m = protos.management

FUZZ_SERVER = os.path.join(ROOT, "tests", "workers", "fuzz_server.py")
MODELS = ("add", "echo", "now", "count")

#: Seconds a call may take before it counts as a hang: every model of
#: FUZZ_SERVER answers at once, so only a lost request takes this long.
DEADLINE = 20.0

#: INTERNAL errors that are no server bug: Triton answers these as INTERNAL
#: too (a region that can't be opened, an output larger than its window).
TRITON_INTERNALS = ("Unable to open shared memory region",
                    "shared memory size specified with the request for output")

#: Requests in flight at once on the gRPC channel.
CONCURRENCY = 16

#: How much the ingress's RSS may grow between the end of the warm-up and
#: the end of the run: RSS_GROWTH_LIMIT plus RSS_GROWTH_SHARE of the bytes
#: sent after the warm-up, which are at least MIN_SENT_AFTER_WARMUP, so an
#: ingress that kept every request, or a fiftieth of each, fails.  What
#: remains is allocator noise: with 2 MiB requests 16 at a time, glibc's
#: dynamic mmap threshold moves large buffers into its arenas, and RSS drifts
#: up and back down again (measured: +15-19 MB in 8 s runs that sent 200-360
#: MB; +40 MB in a 40 s run that sent 1.8 GB; a 10 GB run of large requests
#: only peaked 1.8% of what it sent above its start and then fell back by
#: 90 MB).  Small requests alone (40,000 of them, unknown model names or
#: garbage) moved it by about 1 MB.
RSS_GROWTH_LIMIT = 48 * 1024 * 1024
RSS_GROWTH_SHARE = 0.02
MIN_SENT_AFTER_WARMUP = 4 * RSS_GROWTH_LIMIT

#: Iterations before the RSS baseline is taken: gRPC's, the allocator's and
#: protobuf's pools fill in the first hundreds of requests.
WARMUP = 200


def report(loop, outcomes, **figures):
    extra = "".join("; %s %s" % item for item in figures.items())
    loop.report(outcomes)
    if extra:
        import sys

        sys.stderr.write("  %s%s\n" % (loop.name, extra))


class FuzzTarget:
    """An ingress with FUZZ_SERVER, and the checks every fuzz test ends with."""

    ingress_args = ()

    def start(self, http=False):
        # Two malloc arenas instead of glibc's eight per core: a thread of
        # the front that first handles a large request late in the run
        # would otherwise get an arena of its own, which reads as growth.
        env = dict(os.environ, MALLOC_ARENA_MAX="2")
        self.ingress = Ingress([FUZZ_SERVER], http=http, args=self.ingress_args, env=env)
        self.addCleanup(self.ingress.cleanup)
        self.ingress.wait_ready(*MODELS)
        [self.worker_pid] = self.ingress.worker_pids(FUZZ_SERVER)

    def assertAddWorks(self):
        client = self.ingress.client()
        result = client.infer("add", infer_inputs(a=np.array([1, 2], np.int32),
                                                  b=np.array([3, 4], np.int32)), client_timeout=DEADLINE)
        self.assertEqual(result.as_numpy("sum").tolist(), [4, 6])

    def assertUnharmed(self, loop, baseline_rss=None, sent=0):
        context = loop.context()
        self.assertIsNone(self.ingress.process.poll(), "ingress exited; " + context)
        self.assertTrue(self.ingress.client().is_server_live(), context)
        self.assertAddWorks()
        self.assertEqual(self.ingress.worker_pids(FUZZ_SERVER), [self.worker_pid],
                         "the worker was restarted; " + context)
        log = self.ingress.log()
        for sign in ("Unhandled error in Deferred", "Unhandled Error", "unexpected error"):
            at = log.find(sign)
            self.assertEqual(at, -1, "%r logged: %s; %s" % (sign, log[max(0, at - 300):at + 2500], context))
        if baseline_rss is not None:
            grown = rss_bytes(self.ingress.process.pid) - baseline_rss
            self.assertGreaterEqual(sent, MIN_SENT_AFTER_WARMUP, "too little sent to judge; " + context)
            self.assertLess(grown, RSS_GROWTH_LIMIT + RSS_GROWTH_SHARE * sent,
                            "ingress RSS grew by %d bytes after %d bytes sent; %s" % (grown, sent, context))
            return grown


class ModelInferFuzz(FuzzTarget, SynchronousTestCase):
    """Mutated ModelInferRequest bytes through a raw channel: the ingress
    routes what it can peek, the worker decodes the rest."""

    seconds = 5.0

    def setUp(self):
        self.start()
        self.channel = grpc.insecure_channel(
            self.ingress.address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.addCleanup(self.channel.close)
        self.infer = self.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        self.stream = self.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        # A registered region that requests name, in range and out of it.
        self.region = shared_memory_region(self, 4096)
        self.ingress.client().register_system_shared_memory("fuzz", "/" + self.region.name, self.region.size)

    def request(self, mutator, rng):
        if rng.random() < 0.05:
            data = self.large(mutator, rng.choice(MODELS))
            return mutator.mutate(data) if rng.random() < 0.5 else data
        return mutator.infer_bytes(MODELS)

    @staticmethod
    def large(mutator, model, size=None):
        """A request with one raw input of 1-2 MiB (``size`` bytes), of a
        shape that matches it or not."""
        rng = mutator.rng
        size = size or rng.randrange(1 << 20, 2 << 20)
        message = _v2.ModelInferRequest(model_name=model)
        message.inputs.add(name="a", datatype="INT32",
                           shape=[size // 4 if rng.random() < 0.5 else rng.randrange(1, 1 << 19)])
        message.raw_input_contents.append(rng.randbytes(size))
        return message.SerializeToString()

    def test_mutated_model_infer_bytes(self):
        loop = FuzzLoop("grpc ModelInfer (%s front)" % self.front, self.seconds, minimum=WARMUP + 100)
        mutator = Mutator(loop.rng, regions=("fuzz",), region_size=self.region.size)
        rng = loop.rng
        outcomes = collections.Counter()
        hangs = []
        internal = []  # the first call answered INTERNAL or UNKNOWN: a server bug
        baseline = None
        sent = 0
        calls = []

        def settle():
            for data, call in calls:
                try:
                    call.result()
                    outcomes["OK"] += 1
                except grpc.RpcError as e:
                    code = e.code()
                    outcomes[code.name] += 1
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        hangs.append(data)
                    elif (code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and not internal
                          and not e.details().startswith(TRITON_INTERNALS)):
                        internal.append((code.name, e.details(), data[:2000]))
            del calls[:]

        for i in loop:
            if i == WARMUP:
                # The largest requests, as many at once as the run sends
                # them, so that the baseline includes their buffers.
                for _ in range(3 * CONCURRENCY):
                    calls.append((b"", self.infer.future(self.large(mutator, "echo"), timeout=DEADLINE)))
                settle()
                baseline = rss_bytes(self.ingress.process.pid)
                sent = 0
            if rng.random() < 0.03:
                settle()
                self.fuzz_stream(mutator, rng, outcomes, hangs)
                continue
            data = self.request(mutator, rng)
            sent += len(data)
            calls.append((data, self.infer.future(data, timeout=DEADLINE)))
            if len(calls) >= CONCURRENCY:
                settle()
        settle()
        # Too little sent to judge memory: top up with large requests.
        while sent < MIN_SENT_AFTER_WARMUP:
            data = self.large(mutator, "echo", 2 << 20)
            sent += len(data)
            calls.append((data, self.infer.future(data, timeout=DEADLINE)))
            if len(calls) >= CONCURRENCY:
                settle()
        settle()
        self.assertEqual(hangs[:1], [], "%d calls hung; %s" % (len(hangs), loop.context()))
        self.assertTrue(outcomes["OK"] and outcomes["INVALID_ARGUMENT"], (outcomes, loop.context()))
        # INTERNAL or UNKNOWN (but TRITON_INTERNALS) would be a server bug:
        # no model of FUZZ_SERVER fails on its own.
        self.assertFalse(internal, repr((internal, outcomes, loop.context())))
        grown = self.assertUnharmed(loop, baseline, sent)
        report(loop, outcomes, rss_growth_bytes=grown, bytes_sent=sent)

    def fuzz_stream(self, mutator, rng, outcomes, hangs):
        """One ModelStreamInfer stream of a few mutated requests."""
        messages = [mutator.infer_bytes(MODELS) for _ in range(rng.randrange(1, 5))]
        try:
            for _ in self.stream(iter(messages), timeout=DEADLINE):
                outcomes["stream response"] += 1
            outcomes["stream OK"] += 1
        except grpc.RpcError as e:
            outcomes["stream " + e.code().name] += 1
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                hangs.append(b"stream: " + repr(messages).encode())

    front = "aio"


class ModelInferFuzzThreadFront(ModelInferFuzz):
    """The same through grpcio's thread-pool front."""

    front = "threads"
    ingress_args = ("--front", "threads")
    seconds = 3.0


def compressed(data, encoding):
    compress = zlib.compressobj(wbits=31 if encoding == "gzip" else 15)
    return compress.compress(data) + compress.flush()


_bombs = {}


def bomb(encoding):
    """A body of about 80 KB that inflates past the ingress's 64 MiB limit."""
    if encoding not in _bombs:
        _bombs[encoding] = compressed(bytes(80 * 1024 * 1024), encoding)
    return _bombs[encoding]


#: The REST endpoints other than infer (NAME: a model or region name).
OTHER_ENDPOINTS = (
    ("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/models/NAME"),
    ("GET", "/v2/models/NAME/ready"), ("GET", "/v2/models/NAME/config"),
    ("GET", "/v2/models/NAME/stats"), ("GET", "/v2/models/stats"),
    ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/NAME/load"),
    ("POST", "/v2/repository/models/NAME/unload"), ("GET", "/v2/systemsharedmemory/status"),
    ("POST", "/v2/systemsharedmemory/region/NAME/register"),
    ("POST", "/v2/systemsharedmemory/region/NAME/unregister"), ("DELETE", "/v2/models/NAME"),
    ("GET", "/metrics"), ("POST", "/v2/models/NAME/versions/1/infer"),
)


class RestFuzz(FuzzTarget, SynchronousTestCase):
    """Mutated JSON bodies, binary-data headers and paths over HTTP."""

    def setUp(self):
        self.start(http=True)
        self.connection = None
        self.addCleanup(self.close)

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def post(self, path, body, headers, method="POST"):
        """(status, body), on a kept-alive connection; a new one after the
        server closed it (as it does after a malformed request)."""
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.ingress.http_port,
                                                             timeout=DEADLINE)
            try:
                self.connection.request(method, path, body, headers)
                response = self.connection.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except socket.timeout:
                raise
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise

    def test_mutated_rest_bodies(self):
        loop = FuzzLoop("REST infer", 3.0, minimum=WARMUP)
        mutator = Mutator(loop.rng)
        rng = loop.rng
        outcomes = collections.Counter()
        internal = []  # the first request answered 500
        for _ in loop:
            name = mutator.name(MODELS)
            path = "/v2/models/%s/infer" % urllib.parse.quote(name[:200], safe="")
            if rng.random() < 0.1:
                path = "/v2/models/%s/versions/%s/infer" % (rng.choice(MODELS), rng.choice(("1", "x", "")))
            body = mutator.json_body(MODELS)
            headers = {"Content-Type": rng.choice(("application/json", "application/octet-stream", "x"))}
            roll = rng.random()
            if roll < 0.2:  # a binary tail after the JSON
                tail = rng.randbytes(rng.choice((0, 4, 8, 100)))
                headers["Inference-Header-Content-Length"] = str(rng.choice(
                    (len(body), len(body) + 1, 0, -1, 2 ** 64, len(body) + len(tail))))
                body += tail
            elif roll < 0.25:
                headers["Inference-Header-Content-Length"] = rng.choice(("x", "", "1e3", " 5"))
            elif roll < 0.35:  # compressed, or said to be: whole, mutated, or a bomb
                encoding = rng.choice(("gzip", "deflate", "br"))
                headers["Content-Encoding"] = encoding
                if encoding != "br" and rng.random() < 0.7:
                    body = bomb(encoding) if rng.random() < 0.02 else compressed(body, encoding)
                    if rng.random() < 0.4:
                        body = mutator.mutate(body)
            method = "POST"
            if rng.random() < 0.2:  # another endpoint, with a JSON body that may not fit it
                method, path = rng.choice(OTHER_ENDPOINTS)
                path = path.replace("NAME", urllib.parse.quote(mutator.name(MODELS + ("fuzz",))[:200], safe=""))
                body = mutator.mutate(json.dumps({
                    "ready": rng.choice((True, 1, "x")), "key": rng.choice(("/x", "", 5)),
                    "offset": rng.choice((0, -1, 2 ** 64)), "byte_size": rng.choice((0, 4096, "big")),
                    "parameters": {rng.choice(("unload_dependents", "config", "file:a")): rng.choice((True, "x"))},
                }).encode(), rounds=rng.randrange(3))
            try:
                status, data = self.post(path, body, headers, method)
            except socket.timeout:
                self.fail("REST call hung; %s" % loop.context())
            outcomes[status] += 1
            if path.endswith("/unload") and status == 200:  # back, so that infer is not all 503
                self.post(path[:-len("unload")] + "load", b"", {})
            # 500 is a server bug, but for TRITON_INTERNALS.
            if status == 500 and not internal and not any(
                    message.encode() in data for message in TRITON_INTERNALS):
                internal.append((method, path, headers, body[:300], data[:300]))
            self.assertLess(status, 600, loop.context())
            if status >= 400 and not (path.endswith(("/ready", "/live")) and not data):
                # Errors are JSON with an "error" member, as KServe's REST says
                # (health answers are a bare status).
                try:
                    error = json.loads(data)["error"]
                except (ValueError, KeyError, TypeError):
                    error = None
                self.assertIsInstance(error, str, repr((method, path, status, data[:200], loop.context())))
        self.assertTrue(outcomes[200] and outcomes[400], (outcomes, loop.context()))
        self.assertFalse(internal, repr((internal, outcomes, loop.context())))
        client = self.ingress.client()
        for model in MODELS:  # unloaded by a fuzzed call, maybe
            client.load_model(model)
        self.assertUnharmed(loop)
        report(loop, outcomes)


class ManagementFuzz(FuzzTarget, SynchronousTestCase):
    """Mutated RegisterModel, Heartbeat and UnregisterModel bytes to the
    management port, from a process that is not the worker, mostly with the
    ingress's token (else none or a wrong one): the real worker's ``add`` is
    still served by it, with the same metadata."""

    def setUp(self):
        self.start()
        self.channel = grpc.insecure_channel(self.ingress.mgmt_address)
        self.addCleanup(self.channel.close)
        service = "/anyserve.management.WorkerManagement/"
        self.methods = {name: self.channel.unary_unary(service + name)
                        for name in ("RegisterModel", "Heartbeat", "UnregisterModel")}
        # Registrations point at a socket that listens but never answers,
        # so that some are accepted and the ingress holds their connections.
        self.rogue_socket = socket.socket(socket.AF_UNIX)
        self.addCleanup(self.rogue_socket.close)
        self.rogue_path = os.path.join(self.ingress.tmp, "fuzz.sock")
        self.rogue_socket.bind(self.rogue_path)
        self.rogue_socket.listen(1024)
        self.metadata = list(self.ingress.mgmt_metadata())

    def message(self, mutator, rng, method):
        worker = "fuzz-%d" % rng.randrange(8) if rng.random() < 0.8 else mutator.text()
        key = "key-%d" % rng.randrange(3)
        if method == "RegisterModel":
            message = _m.RegisterModelRequest(
                model_name=mutator.name(MODELS + ("fuzz-a", "fuzz-b")), worker_id=worker,
                worker_address=rng.choice(("unix://" + self.rogue_path, "unix://" + self.rogue_path,
                                           "unix:///nonexistent/x.sock", "127.0.0.1:1", "")),
                platform=rng.choice(("python", mutator.text())))
            for specs in (message.inputs, message.outputs):
                for _ in range(rng.choice((0, 1, 2, 300))):
                    specs.add(name=mutator.name(("a", "b", "sum")),
                              datatype=rng.choice(("INT32", "FP32", "BYTES", "bogus")),
                              shape=mutator.dims())
            message.max_batch_size = rng.choice((0, 0, 4, -1, 2 ** 31 - 1))
            message.preferred_batch_sizes.extend(rng.choice(((), (2,), (0, -5), tuple(range(100)))))
        elif method == "Heartbeat":
            message = _m.HeartbeatRequest(worker_id=worker)
            message.model_names.extend(mutator.name(MODELS) for _ in range(rng.randrange(4)))
        else:
            message = _m.UnregisterModelRequest(model_name=mutator.name(MODELS + ("fuzz-a",)),
                                                worker_id=worker)
        if "worker_key" in message.DESCRIPTOR.fields_by_name:
            message.worker_key = key
        data = message.SerializeToString()
        if rng.random() < 0.6:
            data = mutator.mutate(data)
        return data

    def test_mutated_management_requests(self):
        client = self.ingress.client()
        metadata_before = client.get_model_metadata("add", as_json=True)
        loop = FuzzLoop("management", 3.0, minimum=WARMUP)
        mutator = Mutator(loop.rng)
        rng = loop.rng
        outcomes = collections.Counter()
        for i in loop:
            if i == WARMUP:
                baseline = rss_bytes(self.ingress.process.pid)
            method = rng.choice(("RegisterModel", "RegisterModel", "Heartbeat", "UnregisterModel"))
            data = self.message(mutator, rng, method)
            metadata = self.metadata
            if rng.random() < 0.1:  # no token, or a wrong one
                metadata = rng.choice(((), (("authorization", "Bearer %x" % rng.randrange(2 ** 128)),)))
            try:
                self.methods[method](data, timeout=DEADLINE, metadata=metadata)
                outcomes[method + " OK"] += 1
            except grpc.RpcError as e:
                self.assertNotEqual(e.code(), grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "%s hung; %s" % (method, loop.context()))
                outcomes[method + " " + e.code().name] += 1
        # Most calls reached the management API itself.
        refused = sum(n for outcome, n in outcomes.items() if outcome.endswith("UNAUTHENTICATED"))
        self.assertLess(refused, loop.iteration / 2, (outcomes, loop.context()))
        # Still the real worker's add: same metadata, answered by it.
        self.assertEqual(client.get_model_metadata("add", as_json=True), metadata_before,
                         loop.context())
        for _ in range(20):
            self.assertAddWorks()
        grown = rss_bytes(self.ingress.process.pid) - baseline
        self.assertLess(grown, RSS_GROWTH_LIMIT, "ingress RSS grew by %d bytes; %s" % (grown, loop.context()))
        self.assertUnharmed(loop)
        report(loop, outcomes, rss_growth_bytes=grown)


def repeated(field):
    """Whether a protobuf field is repeated (``label`` is gone from newer protobufs)."""
    flag = getattr(field, "is_repeated", None)
    if flag is None:
        from google.protobuf.descriptor import FieldDescriptor

        return field.label == FieldDescriptor.LABEL_REPEATED
    return flag() if callable(flag) else flag


class InferenceApiFuzz(FuzzTarget, SynchronousTestCase):
    """Mutated requests for every other unary RPC of the inference port
    (metadata, config, statistics, repository, shared memory, trace and
    log settings): each field filled from its type, then bytes mutated."""

    def setUp(self):
        from google.protobuf import message_factory

        self.start()
        self.channel = grpc.insecure_channel(self.ingress.address)
        self.addCleanup(self.channel.close)
        self.region = shared_memory_region(self, 4096)
        self.methods = []
        for method in protos.service_descriptor(protos.INFERENCE_SERVICE).methods:
            if method.client_streaming or method.name == "ModelInfer":
                continue
            call = self.channel.unary_unary("/%s/%s" % (protos.INFERENCE_SERVICE, method.name))
            self.methods.append((method.name, call, message_factory.GetMessageClass(method.input_type)))

    def fill(self, mutator, message, depth=0):
        """Every field of ``message`` set, mostly to something it could mean."""
        from google.protobuf.descriptor import FieldDescriptor as F

        rng = mutator.rng
        for field in message.DESCRIPTOR.fields:
            if rng.random() < 0.3:
                continue
            if field.type == F.TYPE_MESSAGE:
                if depth < 2 and not field.message_type.GetOptions().map_entry:
                    if repeated(field):
                        self.fill(mutator, getattr(message, field.name).add(), depth + 1)
                    else:
                        self.fill(mutator, getattr(message, field.name), depth + 1)
                elif field.message_type.GetOptions().map_entry:
                    value_field = field.message_type.fields_by_name["value"]
                    target = getattr(message, field.name)
                    key = rng.choice(("log_verbose_level", "trace_rate", "unload_dependents", mutator.text()))
                    if value_field.type == F.TYPE_MESSAGE:
                        self.fill(mutator, target[key], depth + 1)
                    elif value_field.type == F.TYPE_STRING:
                        target[key] = mutator.text()
                continue
            if repeated(field):
                continue
            if field.type == F.TYPE_STRING:
                value = rng.choice((mutator.name(MODELS + ("fuzz",)), "/" + self.region.name, ""))
            elif field.type == F.TYPE_BOOL:
                value = rng.random() < 0.5
            elif field.type in (F.TYPE_UINT64, F.TYPE_UINT32, F.TYPE_FIXED64):
                value = rng.choice((0, 1, 4096, 4097, 2 ** 32 - 1 if field.type == F.TYPE_UINT32 else 2 ** 64 - 1))
            elif field.type in (F.TYPE_INT64, F.TYPE_INT32, F.TYPE_SINT64):
                value = rng.choice((0, 1, -1, 4096, 2 ** 31 - 1))
            elif field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
                value = rng.choice((0.0, -1.0, 1e300))
            elif field.type == F.TYPE_BYTES:
                value = mutator.blob()
            else:
                continue
            try:
                setattr(message, field.name, value)
            except (ValueError, TypeError):
                pass

    def test_mutated_api_requests(self):
        loop = FuzzLoop("inference API", 2.5, minimum=WARMUP)
        mutator = Mutator(loop.rng)
        rng = loop.rng
        outcomes = collections.Counter()
        for _ in loop:
            name, call, request_class = rng.choice(self.methods)
            message = request_class()
            self.fill(mutator, message)
            data = message.SerializeToString()
            if rng.random() < 0.5:
                data = mutator.mutate(data)
            try:
                call(data, timeout=DEADLINE)
                outcomes[name + " OK"] += 1
            except grpc.RpcError as e:
                self.assertNotEqual(e.code(), grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "%s hung; %s" % (name, loop.context()))
                outcomes[name + " " + e.code().name] += 1
        # RepositoryModelUnload may have unloaded them, as Triton's explicit mode allows.
        client = self.ingress.client()
        for model in MODELS:
            client.load_model(model)
        self.assertUnharmed(loop)
        report(loop, outcomes)


class LoneSurrogateInControlJson(FuzzTarget, SynchronousTestCase):
    """What the fuzz found (the ingress's twin of LoneSurrogateInJson in
    anyserve_tw/test/test_fuzz_frames.py): a control endpoint's JSON with a
    lone surrogate escape was 500 "unexpected error", with a traceback
    logged per request; now 400."""


    def test_lone_surrogate_is_400(self):
        self.start(http=True)
        for path, body in (
                ("/v2/systemsharedmemory/region/x/register", b'{"key": "\\ud800", "offset": 0, "byte_size": 4}'),
                ("/v2/repository/models/fuzz/load", b'{"parameters": {"\\ud800": "x"}}'),
                ("/v2/models/echo/infer", b'{"inputs": [], "parameters": {"\\ud800": 1}}')):
            connection = http.client.HTTPConnection("127.0.0.1", self.ingress.http_port, timeout=DEADLINE)
            self.addCleanup(connection.close)
            connection.request("POST", path, body)
            response = connection.getresponse()
            self.assertEqual(response.status, 400, (path, response.read()))
        self.assertNotIn("Traceback", self.ingress.log())
