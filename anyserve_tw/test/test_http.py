"""The REST front on a real port, driven by Twisted's HTTP client, with a
fake router and API behind it."""
import base64
import gzip
import json
import zlib

import grpc
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

from anyserve_tw.ingress.http import HttpService, http_status, message_json
from anyserve_tw.wire import framing, protos
from anyserve_tw.wire.errors import InferenceError, not_found, unavailable
from anyserve_tw.wire.payloads import read_http_request

_v2 = protos.inference

API_METHODS = (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
    "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
)


class FakeAPI:
    """Records each call; answers with ``answers[method]``: a message, an
    exception to raise, or a function of the request."""

    def __init__(self):
        self.calls = []
        self.answers = {}
        self.timeouts = {}

    def default_timeout(self, method):
        return self.timeouts.get(method, 5.0)


def _api_method(name):
    def method(self, request, timeout):
        self.calls.append((name, request, timeout))
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer
    method.__name__ = name
    return method


for _name in API_METHODS:
    setattr(FakeAPI, _name, _api_method(_name))


class FakeRouter:
    """``infer`` records its arguments and answers ``self.answer(...)``."""

    def __init__(self):
        self.calls = []
        self.answer = lambda *args: succeed((2, b"{}"))

    def infer(self, name, version, payload, timeout=None, kind=framing.REQUEST):
        self.calls.append((name, version, b"".join(bytes(p) for p in payload), timeout, kind))
        return self.answer(name, version, payload, timeout, kind)


@implementer(IBodyProducer)
class Body:
    """A request body, written at once (no timers left behind)."""

    def __init__(self, data):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return succeed(None)

    def stopProducing(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


@implementer(IBodyProducer)
class ChunkedProducer:
    """A body of unknown length, so the client sends it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, data):
        self.data = data

    def startProducing(self, consumer):
        for start in range(0, len(self.data), 1000):
            consumer.write(self.data[start:start + 1000])
        return succeed(None)

    def stopProducing(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


class Metrics(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"anyserve_up 1\n"


class HttpTestCase(TestCase):
    limit = 4096

    def setUp(self):
        self.api = FakeAPI()
        self.router = FakeRouter()
        self.service = self.start(self.api)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool)
        self.addCleanup(self.pool.closeCachedConnections)

    def start(self, api, **kwargs):
        service = HttpService(reactor, "127.0.0.1", 0, self.router, api, metrics_resource=Metrics(),
                              max_message_size=self.limit, **kwargs)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def url(self, path, service=None):
        return b"http://127.0.0.1:%d%s" % ((service or self.service).bound_port, path.encode())

    @inlineCallbacks
    def fetch(self, method, path, body=None, headers=None, producer=None, service=None):
        """(status, headers, body) of one request."""
        if producer is None and body is not None:
            producer = Body(body)
        response = yield self.agent.request(method.encode(), self.url(path, service),
                                            Headers(headers or {}), producer)
        data = yield readBody(response)
        return response.code, response.headers, data

    @inlineCallbacks
    def fetch_json(self, method, path, body=None, status=200, **kwargs):
        code, headers, data = yield self.fetch(method, path, body, **kwargs)
        self.assertEqual((code, data and headers.getRawHeaders(b"content-type")), (status, [b"application/json"]),
                         data)
        return json.loads(data)


class ServerEndpointTests(HttpTestCase):
    @inlineCallbacks
    def test_server_metadata(self):
        self.api.answers["ServerMetadata"] = _v2.ServerMetadataResponse(
            name="anyserve", version="1.2", extensions=["statistics"])
        body = yield self.fetch_json("GET", "/v2")
        self.assertEqual(body, {"name": "anyserve", "version": "1.2", "extensions": ["statistics"]})

    @inlineCallbacks
    def test_health_is_200_with_kserves_body_or_400(self):
        self.api.answers["ServerLive"] = _v2.ServerLiveResponse(live=True)
        self.api.answers["ServerReady"] = _v2.ServerReadyResponse(ready=True)
        code, _, data = yield self.fetch("GET", "/v2/health/live")
        self.assertEqual((code, json.loads(data)), (200, {"live": True}))
        code, _, data = yield self.fetch("GET", "/v2/health/ready")
        self.assertEqual((code, json.loads(data)), (200, {"ready": True}))
        self.api.answers["ServerReady"] = _v2.ServerReadyResponse(ready=False)
        code, _, data = yield self.fetch("GET", "/v2/health/ready")
        self.assertEqual((code, data), (400, b""))

    @inlineCallbacks
    def test_head_answers_headers_only(self):
        self.api.answers["ServerMetadata"] = _v2.ServerMetadataResponse(name="anyserve")
        code, headers, data = yield self.fetch("HEAD", "/v2")
        self.assertEqual((code, data), (200, b""))
        self.assertEqual(headers.getRawHeaders(b"content-length"), [b"%d" % len(
            json.dumps({"name": "anyserve", "version": "", "extensions": []}, separators=(",", ":")))])

    @inlineCallbacks
    def test_metrics_resource_is_mounted(self):
        code, headers, data = yield self.fetch("GET", "/metrics")
        self.assertEqual((code, data), (200, b"anyserve_up 1\n"))

    @inlineCallbacks
    def test_unknown_paths_are_404_json(self):
        for path in ("/", "/v1", "/v2/", "/v2/models", "/v2/health/live/extra", "/v2/models/add/versions",
                     "/v2/models/add/unknown", "/v2/repository/models/add"):
            body = yield self.fetch_json("GET", path, status=404)
            self.assertEqual(body, {"error": "Not Found"}, path)
        self.assertEqual(self.api.calls, [])

    @inlineCallbacks
    def test_wrong_method_is_405_with_allow(self):
        code, headers, data = yield self.fetch("POST", "/v2/health/live", b"")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertIn("POST", json.loads(data)["error"])
        code, headers, _ = yield self.fetch("GET", "/v2/models/add/infer")
        self.assertEqual((code, headers.getRawHeaders(b"allow")), (405, [b"POST"]))
        self.assertEqual(self.router.calls, [])


class ModelEndpointTests(HttpTestCase):
    def metadata(self, request):
        tensor = _v2.ModelMetadataResponse.TensorMetadata
        return _v2.ModelMetadataResponse(
            name=request.name, versions=["1", "2"], platform="python",
            inputs=[tensor(name="a", datatype="INT32", shape=[-1, 3])],
            outputs=[tensor(name="sum", datatype="INT64", shape=[2 ** 40])])

    @inlineCallbacks
    def test_metadata_shapes_are_json_integers(self):
        self.api.answers["ModelMetadata"] = self.metadata
        body = yield self.fetch_json("GET", "/v2/models/add")
        self.assertEqual(body, {
            "name": "add", "versions": ["1", "2"], "platform": "python",
            "inputs": [{"name": "a", "datatype": "INT32", "shape": [-1, 3]}],
            "outputs": [{"name": "sum", "datatype": "INT64", "shape": [2 ** 40]}]})
        name, request, timeout = self.api.calls[-1]
        self.assertEqual((name, request.name, request.version, timeout), ("ModelMetadata", "add", "", 5.0))

    @inlineCallbacks
    def test_version_and_percent_encoded_name_come_from_the_url(self):
        self.api.answers["ModelMetadata"] = self.metadata
        yield self.fetch_json("GET", "/v2/models/my%20model%2Fx/versions/v2")
        _, request, _ = self.api.calls[-1]
        self.assertEqual((request.name, request.version), ("my model/x", "v2"))

    @inlineCallbacks
    def test_model_ready(self):
        self.api.answers["ModelReady"] = lambda r: _v2.ModelReadyResponse(ready=r.version == "1")
        code, _, data = yield self.fetch("GET", "/v2/models/add/versions/1/ready")
        self.assertEqual((code, data), (200, b""))
        code, _, data = yield self.fetch("GET", "/v2/models/add/ready")
        self.assertEqual((code, data), (400, b""))
        self.assertEqual([(r.name, r.version) for _, r, _ in self.api.calls], [("add", "1"), ("add", "")])

    @inlineCallbacks
    def test_config_prints_as_triton_does(self):
        config = _v2.ModelConfig(
            name="add", backend="python", max_batch_size=8,
            input=[_v2.ModelInput(name="a", data_type=8, dims=[-1])],
            instance_group=[_v2.ModelInstanceGroup(count=2, kind=_v2.ModelInstanceGroup.KIND_CPU)])
        config.dynamic_batching.max_queue_delay_microseconds = 100
        self.api.answers["ModelConfig"] = _v2.ModelConfigResponse(config=config)
        body = yield self.fetch_json("GET", "/v2/models/add/versions/3/config")
        self.assertEqual(body["input"], [{"name": "a", "data_type": "TYPE_INT32", "dims": [-1], "optional": False}])
        self.assertEqual(body["dynamic_batching"], {"preferred_batch_size": [], "max_queue_delay_microseconds": 100})
        self.assertEqual(body["instance_group"], [{"name": "", "count": 2, "kind": "KIND_CPU"}])
        self.assertEqual((body["name"], body["max_batch_size"], body["parameters"]), ("add", 8, {}))
        self.assertNotIn("version_policy", body)  # unset: left out, as protobuf's JSON does
        _, request, _ = self.api.calls[-1]
        self.assertEqual((request.name, request.version), ("add", "3"))

    @inlineCallbacks
    def test_statistics_of_all_models_and_of_one_version(self):
        stats = _v2.ModelStatistics(name="add", version="1", inference_count=3, last_inference=2 ** 41)
        stats.inference_stats.success.count = 3
        self.api.answers["ModelStatistics"] = _v2.ModelStatisticsResponse(model_stats=[stats])
        body = yield self.fetch_json("GET", "/v2/models/stats")
        entry = body["model_stats"][0]
        self.assertEqual((entry["inference_count"], entry["last_inference"]), (3, 2 ** 41))
        self.assertEqual(entry["inference_stats"]["success"], {"count": 3, "ns": 0})
        self.assertEqual(entry["inference_stats"]["cache_miss"], {"count": 0, "ns": 0})  # unset, printed
        yield self.fetch_json("GET", "/v2/models/add/versions/1/stats")
        yield self.fetch_json("GET", "/v2/models/add/stats")
        self.assertEqual([(r.name, r.version) for _, r, _ in self.api.calls], [("", ""), ("add", "1"), ("add", "")])

    @inlineCallbacks
    def test_a_model_named_stats_is_still_reachable(self):
        self.api.answers["ModelReady"] = _v2.ModelReadyResponse(ready=True)
        code, _, _ = yield self.fetch("GET", "/v2/models/stats/ready")
        self.assertEqual(code, 200)
        self.assertEqual(self.api.calls[-1][1].name, "stats")


class RepositoryTests(HttpTestCase):
    @inlineCallbacks
    def test_index_is_a_json_list(self):
        entry = _v2.RepositoryIndexResponse.ModelIndex
        self.api.answers["RepositoryIndex"] = _v2.RepositoryIndexResponse(models=[
            entry(name="add", version="1", state="READY", reason="1 worker")])
        body = yield self.fetch_json("POST", "/v2/repository/index", b"")
        self.assertEqual(body, [{"name": "add", "version": "1", "state": "READY", "reason": "1 worker"}])
        yield self.fetch_json("POST", "/v2/repository/index", b'{"ready": true}')
        self.assertEqual([r.ready for _, r, _ in self.api.calls], [False, True])

    @inlineCallbacks
    def test_load_and_unload_pass_their_parameters(self):
        self.api.answers["RepositoryModelLoad"] = _v2.RepositoryModelLoadResponse()
        self.api.answers["RepositoryModelUnload"] = _v2.RepositoryModelUnloadResponse()
        body = json.dumps({"parameters": {"config": "{}", "file:1/model.py": base64.b64encode(b"\x00py").decode(),
                                          "n": 3}}).encode()
        code, _, data = yield self.fetch("POST", "/v2/repository/models/add/load", body)
        self.assertEqual((code, data), (200, b""))
        _, request, _ = self.api.calls[-1]
        self.assertEqual(request.model_name, "add")
        self.assertEqual(request.parameters["config"].string_param, "{}")
        self.assertEqual(request.parameters["file:1/model.py"].bytes_param, b"\x00py")
        self.assertEqual(request.parameters["n"].int64_param, 3)
        code, _, _ = yield self.fetch("POST", "/v2/repository/models/add/unload",
                                      b'{"parameters": {"unload_dependents": false}}')
        self.assertEqual(code, 200)
        _, request, _ = self.api.calls[-1]
        self.assertEqual(request.parameters["unload_dependents"].WhichOneof("parameter_choice"), "bool_param")

    @inlineCallbacks
    def test_malformed_control_bodies_are_400(self):
        for body in (b"{", b"[]", b'{"parameters": []}', b'{"parameters": {"x": null}}',
                     b"[" * 1500 + b"]" * 1500, b'{"parameters": {"x": %d}}' % 2 ** 63):
            answer = yield self.fetch_json("POST", "/v2/repository/models/add/load", body, status=400)
            self.assertTrue(answer["error"], body)
        answer = yield self.fetch_json("POST", "/v2/repository/index", b'{"ready": "yes"}', status=400)
        self.assertIn("ready", answer["error"])
        self.assertEqual(self.api.calls, [])

    @inlineCallbacks
    def test_a_named_repository_reaches_the_api(self):
        self.api.answers["RepositoryIndex"] = InferenceError(grpc.StatusCode.UNIMPLEMENTED, "one repository")
        body = yield self.fetch_json("POST", "/v2/repository/other/index", b"", status=501)
        self.assertEqual(body, {"error": "one repository"})
        self.assertEqual(self.api.calls[-1][1].repository_name, "other")


class SharedMemoryTests(HttpTestCase):
    @inlineCallbacks
    def test_register_status_unregister(self):
        self.api.answers["SystemSharedMemoryRegister"] = _v2.SystemSharedMemoryRegisterResponse()
        self.api.answers["SystemSharedMemoryUnregister"] = _v2.SystemSharedMemoryUnregisterResponse()
        status = _v2.SystemSharedMemoryStatusResponse.RegionStatus
        self.api.answers["SystemSharedMemoryStatus"] = _v2.SystemSharedMemoryStatusResponse(regions={
            "in": status(name="in", key="/in", offset=8, byte_size=2 ** 33)})
        code, _, _ = yield self.fetch("POST", "/v2/systemsharedmemory/region/in/register",
                                      b'{"key": "/in", "offset": 8, "byte_size": 64}')
        self.assertEqual(code, 200)
        _, request, _ = self.api.calls[-1]
        self.assertEqual((request.name, request.key, request.offset, request.byte_size), ("in", "/in", 8, 64))
        body = yield self.fetch_json("GET", "/v2/systemsharedmemory/status")
        self.assertEqual(body, [{"name": "in", "key": "/in", "offset": 8, "byte_size": 2 ** 33}])
        yield self.fetch_json("GET", "/v2/systemsharedmemory/region/in/status")
        self.assertEqual(self.api.calls[-1][1].name, "in")
        code, _, _ = yield self.fetch("POST", "/v2/systemsharedmemory/unregister", b"")
        self.assertEqual((code, self.api.calls[-1][1].name), (200, ""))

    @inlineCallbacks
    def test_register_needs_a_key(self):
        body = yield self.fetch_json("POST", "/v2/systemsharedmemory/region/in/register", b'{"byte_size": 4}',
                                     status=400)
        self.assertIn("key", body["error"])
        body = yield self.fetch_json("POST", "/v2/systemsharedmemory/region/in/register",
                                     b'{"key": "/k", "byte_size": -4}', status=400)
        self.assertIn("byte_size", body["error"])


class ErrorTests(HttpTestCase):
    @inlineCallbacks
    def test_inference_errors_become_triton_statuses(self):
        cases = [(not_found("x"), 404), (unavailable("gone"), 503),
                 (InferenceError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), 400),
                 (InferenceError(grpc.StatusCode.UNIMPLEMENTED, "no"), 501),
                 (InferenceError(grpc.StatusCode.INTERNAL, "oops"), 500)]
        for error, status in cases:
            self.api.answers["ModelMetadata"] = error
            body = yield self.fetch_json("GET", "/v2/models/x", status=status)
            self.assertEqual(body, {"error": error.message})

    @inlineCallbacks
    def test_a_failing_deferred_and_an_unexpected_exception(self):
        self.api.answers["ModelConfig"] = lambda r: _failed(unavailable("later"))
        body = yield self.fetch_json("GET", "/v2/models/x/config", status=503)
        self.assertEqual(body, {"error": "later"})
        self.api.answers["ModelConfig"] = KeyError("boom")
        body = yield self.fetch_json("GET", "/v2/models/x/config", status=500)
        self.assertIn("boom", body["error"])
        self.flushLoggedErrors(KeyError)

    @inlineCallbacks
    def test_a_slow_api_call_times_out_and_is_cancelled(self):
        cancelled = []
        self.api.timeouts["ModelConfig"] = 0.05
        self.api.answers["ModelConfig"] = lambda r: Deferred(cancelled.append)
        body = yield self.fetch_json("GET", "/v2/models/x/config", status=504)
        self.assertEqual(body, {"error": "deadline exceeded"})
        self.assertEqual(len(cancelled), 1)

    @inlineCallbacks
    def test_an_api_without_the_method_answers_501(self):
        class Partial:
            def default_timeout(self, method):
                return 1.0

        service = self.start(Partial())
        body = yield self.fetch_json("GET", "/v2/models/x/stats", status=501, service=service)
        self.assertEqual(body, {"error": "ModelStatistics is not implemented by this server"})

    def test_status_mapping(self):
        self.assertEqual(http_status(grpc.StatusCode.RESOURCE_EXHAUSTED), 429)
        self.assertEqual(http_status(grpc.StatusCode.DEADLINE_EXCEEDED), 504)
        self.assertEqual(http_status(grpc.StatusCode.CANCELLED), 400)
        self.assertEqual(http_status(grpc.StatusCode.DATA_LOSS), 500)


def _failed(error):
    d = Deferred()
    d.errback(error)
    return d


class InferTests(HttpTestCase):
    @inlineCallbacks
    def test_body_is_forwarded_untouched_as_an_http_request_frame(self):
        body = b'{"inputs":[]}' + b"\x00\x01\x02"
        self.router.answer = lambda *a: succeed((14, b'{"outputs":[]}'))
        code, headers, data = yield self.fetch(
            "POST", "/v2/models/add/versions/v3/infer", body, {b"Inference-Header-Content-Length": [b"13"]})
        self.assertEqual((code, data), (200, b'{"outputs":[]}'))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertIsNone(headers.getRawHeaders(b"inference-header-content-length"))
        name, version, payload, timeout, kind = self.router.calls[-1]
        self.assertEqual((name, version, timeout, kind), ("add", "v3", 5.0, framing.HTTP_REQUEST))
        frame = read_http_request(payload)
        self.assertEqual((frame.name, frame.version, bytes(frame.json), bytes(frame.binary)),
                         ("add", "v3", b'{"inputs":[]}', b"\x00\x01\x02"))

    @inlineCallbacks
    def test_without_the_header_the_whole_body_is_json(self):
        self.api.timeouts["ModelInfer"] = 7.0
        yield self.fetch("POST", "/v2/models/add/infer", b'{"inputs":[]}')
        name, version, payload, timeout, _ = self.router.calls[-1]
        frame = read_http_request(payload)
        self.assertEqual((name, version, timeout, bytes(frame.json), bytes(frame.binary)),
                         ("add", "", 7.0, b'{"inputs":[]}', b""))

    @inlineCallbacks
    def test_binary_outputs_get_octet_stream_and_the_json_length(self):
        self.router.answer = lambda *a: succeed((2, b"{}\x01\x02\x03"))
        code, headers, data = yield self.fetch("POST", "/v2/models/add/infer", b"{}")
        self.assertEqual((code, data), (200, b"{}\x01\x02\x03"))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/octet-stream"])
        self.assertEqual(headers.getRawHeaders(b"inference-header-content-length"), [b"2"])

    @inlineCallbacks
    def test_bad_json_length_headers_are_400_without_a_worker(self):
        for value in (b"x", b"-1", b"9"):
            body = yield self.fetch_json("POST", "/v2/models/add/infer", b"{}\x00\x00", status=400,
                                         headers={b"Inference-Header-Content-Length": [value]})
            self.assertIn("Inference-Header-Content-Length", body["error"])
        self.assertEqual(self.router.calls, [])

    @inlineCallbacks
    def test_worker_errors_become_statuses(self):
        for code, status in ((grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.NOT_FOUND, 404),
                             (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
                             (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.INTERNAL, 500)):
            self.router.answer = lambda *a, code=code: _failed(InferenceError(code, "because"))
            body = yield self.fetch_json("POST", "/v2/models/add/infer", b"{}", status=status)
            self.assertEqual(body, {"error": "because"})

    @inlineCallbacks
    def test_a_slow_worker_times_out_and_is_cancelled(self):
        cancelled = []
        self.api.timeouts["ModelInfer"] = 0.05
        self.router.answer = lambda *a: Deferred(cancelled.append)
        body = yield self.fetch_json("POST", "/v2/models/add/infer", b"{}", status=504)
        self.assertEqual(body, {"error": "deadline exceeded"})
        self.assertEqual(len(cancelled), 1)

    @inlineCallbacks
    def test_a_client_going_away_cancels_the_request(self):
        cancelled = Deferred()
        self.router.answer = lambda *a: Deferred(lambda d: cancelled.callback(True))

        class Hangup(Protocol):
            def connectionMade(self):
                self.transport.write(b"POST /v2/models/add/infer HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 2\r\n\r\n{}")

            def dataReceived(self, data):
                pass

        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.service.bound_port), Hangup())
        while not self.router.calls:
            yield _later(0.01)
        client.transport.loseConnection()
        self.assertTrue((yield cancelled.addTimeout(5, reactor)))
        # and the server goes on serving
        self.router.answer = lambda *a: succeed((2, b"{}"))
        code, _, _ = yield self.fetch("POST", "/v2/models/add/infer", b"{}")
        self.assertEqual(code, 200)


def _later(seconds):
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class BodyTests(HttpTestCase):
    limit = 4096

    @inlineCallbacks
    def test_a_body_over_the_limit_is_413_and_the_server_goes_on(self):
        body = yield self.fetch_json("POST", "/v2/models/add/infer", b"x" * (self.limit + 1), status=413)
        self.assertIn("4096-byte limit", body["error"])
        body = yield self.fetch_json("POST", "/v2/models/add/infer", producer=ChunkedProducer(b"x" * 10000),
                                     status=413)
        self.assertIn("limit", body["error"])
        self.assertEqual(self.router.calls, [])
        code, _, _ = yield self.fetch("POST", "/v2/models/add/infer", b"x" * self.limit)
        self.assertEqual(code, 200)
        code, _, _ = yield self.fetch("POST", "/v2/models/add/infer", producer=ChunkedProducer(b"y" * 3000))
        self.assertEqual(code, 200)
        self.assertEqual([call[2][-3000:] for call in self.router.calls][1], b"y" * 3000)

    @inlineCallbacks
    def test_a_large_body_is_read_in_large_reads_then_the_read_size_is_restored(self):
        service = HttpService(reactor, "127.0.0.1", 0, self.router, self.api, max_message_size=1 << 20)
        service.startService()
        self.addCleanup(service.stopService)
        sizes = []
        self.router.answer = lambda *a: succeed(
            (2, b"{}" if sizes.append([c.transport.bufferSize for c in service.site.channels]) else b"{}"))
        body = bytes(range(256)) * 1200  # 300 kB
        code, _, _ = yield self.fetch("POST", "/v2/models/add/infer", body, service=service)
        self.assertEqual(code, 200)
        self.assertEqual(read_http_request(self.router.calls[-1][2]).json, body)
        self.assertEqual(sizes, [[64 * 1024]])

    @inlineCallbacks
    def test_compressed_bodies_are_inflated(self):
        body = b'{"inputs": []}' + bytes(range(200))
        for encoding, packed in ((b"gzip", gzip.compress(body)), (b"deflate", zlib.compress(body)),
                                 (b"deflate", zlib.compress(body)[2:-4])):  # raw deflate too
            code, _, _ = yield self.fetch("POST", "/v2/models/add/infer", packed,
                                          {b"Content-Encoding": [encoding],
                                           b"Inference-Header-Content-Length": [b"14"]})
            self.assertEqual(code, 200)
            frame = read_http_request(self.router.calls[-1][2])
            self.assertEqual((bytes(frame.json), bytes(frame.binary)), (body[:14], body[14:]))

    @inlineCallbacks
    def test_bad_encodings(self):
        body = yield self.fetch_json("POST", "/v2/models/add/infer", b"{}", status=415,
                                     headers={b"Content-Encoding": [b"br"]})
        self.assertIn("br", body["error"])
        yield self.fetch_json("POST", "/v2/models/add/infer", b"not gzip", status=400,
                              headers={b"Content-Encoding": [b"gzip"]})
        yield self.fetch_json("POST", "/v2/models/add/infer", gzip.compress(b"{}")[:-3], status=400,
                              headers={b"Content-Encoding": [b"gzip"]})
        body = yield self.fetch_json("POST", "/v2/models/add/infer", gzip.compress(b"0" * (self.limit + 1)),
                                     status=413, headers={b"Content-Encoding": [b"gzip"]})
        self.assertIn("decompressed", body["error"])
        self.assertEqual(self.router.calls, [])


class LifecycleTests(HttpTestCase):
    @inlineCallbacks
    def test_stop_drains_in_flight_requests_and_refuses_new_ones(self):
        pending = Deferred()
        self.router.answer = lambda *a: pending
        self.api.answers["ServerLive"] = _v2.ServerLiveResponse(live=True)
        # Two at once leave two kept-alive connections: one for each request below.
        answers = yield gatherResults([self.fetch("GET", "/v2/health/live"), self.fetch("GET", "/v2/health/live")])
        self.assertEqual([code for code, _, _ in answers], [200, 200])
        in_flight = self.fetch("POST", "/v2/models/add/infer", b"{}")
        while not self.router.calls:
            yield _later(0.01)
        stopped = self.service.stopService()
        self.assertFalse(stopped.called)
        code, _, data = yield self.fetch("GET", "/v2/health/live")  # on the kept-alive connection
        self.assertEqual((code, json.loads(data)), (503, {"error": "server is shutting down"}))
        pending.callback((2, b"{}"))
        code, _, data = yield in_flight
        self.assertEqual((code, data), (200, b"{}"))
        yield stopped
        self.assertEqual(self.service.site.channels, set())
        yield self.assertFailure(self.fetch("GET", "/v2/health/live"), ConnectionRefusedError)

    @inlineCallbacks
    def test_ipv6_hosts_as_grpc_writes_them(self):
        self.api.answers["ServerLive"] = _v2.ServerLiveResponse(live=True)
        service = HttpService(reactor, "[::1]", 0, self.router, self.api)
        service.startService()
        self.addCleanup(service.stopService)
        response = yield self.agent.request(b"GET", b"http://[::1]:%d/v2/health/live" % service.bound_port)
        yield readBody(response)
        self.assertEqual(response.code, 200)

    def test_a_busy_port_fails_at_start(self):
        service = HttpService(reactor, "127.0.0.1", self.service.bound_port, self.router, self.api)
        self.assertRaises(Exception, service.startService)
        self.assertFalse(service.running)


class MessageJsonTests(SynchronousTestCase):
    def test_int64_enum_bytes_map_and_oneof(self):
        message = _v2.ModelConfig(name="m", input=[_v2.ModelInput(name="a", data_type=8, dims=[-1, 2 ** 62])])
        message.parameters["k"].string_value = "v"
        out = message_json(message)
        self.assertEqual(out["input"][0]["dims"], [-1, 2 ** 62])
        self.assertEqual(out["input"][0]["data_type"], "TYPE_INT32")
        self.assertEqual(out["parameters"], {"k": {"string_value": "v"}})
        self.assertNotIn("dynamic_batching", out)  # an unset oneof
        self.assertNotIn("model_transaction_policy", out)  # an unset message
        self.assertIn("model_transaction_policy", message_json(message, unset_messages=True))
        self.assertNotIn("dynamic_batching", message_json(message, unset_messages=True))
        parameter = _v2.ModelRepositoryParameter(bytes_param=b"\xff")
        self.assertEqual(message_json(parameter), {"bytes_param": "/w=="})
