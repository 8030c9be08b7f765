"""Tests for anyserve_tw.ingress.management: malformed registrations are refused with
INVALID_ARGUMENT before anything reaches the router; good ones reach it whole;
conflicting signatures and registrations past the caps are refused, on a real
Router driven by a MemoryReactorClock."""
import grpc
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos
from anyserve_tw.ingress import management
from anyserve_tw.ingress.management import ManagementAPI
from anyserve_tw.ingress.router import Router
from anyserve_tw.test.test_workerlink import FailsWithMixin, accept_pending, fail_attempt
from anyserve_tw.ingress.registry import ModelRegistry
from anyserve_tw.test.test_registry import FakeWorker
from anyserve_tw.wire.errors import InferenceError

_m = protos.management


class Aborted(Exception):
    pass


class AbortingContext:
    """grpc's context.abort raises; so does this one."""

    def abort(self, code, message):
        raise Aborted(code, message)


class UnusedRouter:
    def __getattr__(self, name):
        raise AssertionError("a malformed registration reached the router (%s)" % name)


class RegisterModelValidationTests(SynchronousTestCase):
    def status(self, **fields):
        request = _m.RegisterModelRequest(**fields)
        api = ManagementAPI(UnusedRouter())
        with self.assertRaises(InferenceError) as caught:
            api.RegisterModel(request, 10.0)
        return caught.exception.code, caught.exception.message

    def test_malformed_registrations(self):
        good = dict(model_name="add", worker_id="w1", worker_address="unix:///tmp/w.sock")
        cases = [
            (dict(good, model_name=""), "model_name is required"),
            (dict(good, worker_id=""), "worker_id is required"),
            (dict(good, inputs=[_m.TensorSpec(name="", datatype="INT32")]), "input tensor without a name"),
            (dict(good, outputs=[_m.TensorSpec(name="y", datatype="INT33")]), "output 'y': unknown datatype 'INT33'"),
        ]
        for fields, message in cases:
            self.assertEqual(self.status(**fields), (grpc.StatusCode.INVALID_ARGUMENT, message))

    def test_malformed_configuration(self):
        good = dict(model_name="add", worker_id="w1", worker_address="unix:///tmp/w.sock")
        cases = [
            (dict(good, max_batch_size=-1), "max_batch_size must be >= 0, not -1"),
            (dict(good, max_batch_size=4, preferred_batch_sizes=[2, 8]),
             "preferred batch size 8 is not within 1..max_batch_size (4)"),
            (dict(good, max_batch_size=4, preferred_batch_sizes=[0]),
             "preferred batch size 0 is not within 1..max_batch_size (4)"),
        ]
        for fields, message in cases:
            self.assertEqual(self.status(**fields), (grpc.StatusCode.INVALID_ARGUMENT, message))


class RecordingRouter:
    def __init__(self):
        self.calls = []
        self.reactor = Clock()
        self.workers = {}
        self.registry = ModelRegistry()

    def register_model(self, *args, **config):
        self.calls.append((args, config))
        return succeed(True)


class RegisterModelTests(SynchronousTestCase):
    def register(self, **fields):
        router = RecordingRouter()
        request = _m.RegisterModelRequest(
            model_name="cls", model_version="v1", worker_id="w1", worker_address="unix:///tmp/w.sock",
            worker_key="key-w1", platform="python", inputs=[_m.TensorSpec(name="x", datatype="FP32", shape=[-1, 4])], **fields)
        response = self.successResultOf(ManagementAPI(router).RegisterModel(request, 10.0))
        self.assertTrue(response.success)
        [(args, config)] = router.calls
        self.assertEqual(args, ("w1", "unix:///tmp/w.sock", "cls", "v1", "python", [("x", "FP32", (-1, 4))], []))
        return config

    def test_configuration_passed_as_keywords(self):
        """The batching and decoupled settings reach the router as keyword
        arguments the registry takes."""
        config = self.register(decoupled=True, max_batch_size=8, preferred_batch_sizes=[2, 4],
                               max_queue_delay_us=250)
        self.assertEqual(config, dict(decoupled=True, max_batch_size=8, preferred_batch_sizes=(2, 4),
                                      max_queue_delay_us=250))
        # And the registry accepts exactly those.
        model = ModelRegistry().register(FakeWorker("w1"), "cls", "v1", "python", (), (), **config)
        self.assertEqual((model.decoupled, model.max_batch_size, model.preferred_batch_sizes,
                          model.max_queue_delay_us), (True, 8, (2, 4), 250))

    def test_defaults(self):
        """An older worker sending none of them: Triton's defaults."""
        self.assertEqual(self.register(), dict(decoupled=False, max_batch_size=0, preferred_batch_sizes=(),
                                               max_queue_delay_us=0))

    def test_preferred_sizes_without_max(self):
        """Preferred sizes with max_batch_size 0 are only checked to be positive."""
        self.assertEqual(self.register(preferred_batch_sizes=[16])["preferred_batch_sizes"], (16,))


def spec(name, datatype="INT32", shape=(-1,)):
    return _m.TensorSpec(name=name, datatype=datatype, shape=list(shape))


ADD = dict(platform="python", inputs=[spec("a"), spec("b")], outputs=[spec("sum")])


class RouterBackedTestCase(FailsWithMixin, SynchronousTestCase):
    """ManagementAPI over a real Router; connections completed by hand."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.router = Router(self.reactor, pool_size=1, heartbeat_timeout=10.0, connect_timeout=3.0)
        self.api = ManagementAPI(self.router)
        self.events = []
        self.api.log = Logger(observer=self.events.append)
        self.accepted = 0

    def request(self, worker_id, name="add", version="", **fields):
        fields = dict(ADD, **fields)
        fields.setdefault("worker_key", "key-" + worker_id[:40])
        return _m.RegisterModelRequest(
            model_name=name, model_version=version, worker_id=worker_id,
            worker_address="unix:///tmp/%s.sock" % worker_id[:50], **fields)

    def start(self, worker_id, name="add", version="", **fields):
        """A registration's Deferred, its connections not yet accepted."""
        return self.api.RegisterModel(self.request(worker_id, name, version, **fields), 10.0)

    def accept(self):
        links = accept_pending(self.reactor, self.accepted)
        self.accepted = len(self.reactor.unixClients)
        return links

    def register(self, worker_id, name="add", version="", **fields):
        d = self.start(worker_id, name, version, **fields)
        links = self.accept()
        self.assertTrue(self.successResultOf(d).success)
        return links

    def refused(self, worker_id, name="add", version="", **fields):
        """The InferenceError a registration is refused with; no connection attempted."""
        before = len(self.reactor.unixClients)
        with self.assertRaises(InferenceError) as caught:
            self.start(worker_id, name, version, **fields)
        self.assertEqual(len(self.reactor.unixClients), before)
        return caught.exception

    def metadata(self, name="add"):
        model = self.router.registry.resolve(name)
        return model.platform, model.inputs, model.outputs, model.decoupled, model.max_batch_size


class SignatureConflictTests(RouterBackedTestCase):
    def test_conflicting_signature_refused(self):
        """A second worker declaring other tensors for a live (name, version)
        is refused, named, and changes nothing: the live worker keeps it."""
        self.register("w1")
        before = self.metadata()
        e = self.refused("rogue", inputs=[spec("a", "FP32")], outputs=[spec("out")])
        self.assertEqual(e.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("model 'add'", e.message)
        self.assertIn("inputs, outputs differ", e.message)
        self.assertIn("w1", e.message)
        self.assertEqual(self.metadata(), before)
        self.assertEqual([w.worker_id for w in self.router.registry.resolve("add").workers], ["w1"])
        self.assertNotIn("rogue", self.router.workers)

    def test_each_signature_field_counts(self):
        self.register("w1", version="1")
        for fields, field in ((dict(platform="onnx"), "platform"), (dict(decoupled=True), "decoupled"),
                              (dict(max_batch_size=8), "max_batch_size"),
                              (dict(inputs=[spec("a", shape=[2]), spec("b")]), "inputs")):
            e = self.refused("w2", version="1", **fields)
            self.assertEqual(e.code, grpc.StatusCode.FAILED_PRECONDITION)
            self.assertIn("version '1'", e.message)
            self.assertIn("whose %s differs" % field, e.message)

    def test_identical_registration_accepted(self):
        """Another worker of the same signature, and the same worker again."""
        self.register("w1")
        self.register("w2")
        self.register("w1")
        self.assertEqual(sorted(w.worker_id for w in self.router.registry.resolve("add").workers), ["w1", "w2"])
        # Other versions are other models.
        self.register("w3", version="2", platform="onnx")

    def test_own_model_may_change(self):
        """The only live worker of a model may declare a new signature."""
        self.register("w1")
        self.register("w1", platform="onnx")
        self.assertEqual(self.metadata()[0], "onnx")

    def test_without_live_worker_new_signature_accepted(self):
        """Once its workers are lost (known but not ready) or withdrawn, a
        model may come back with another signature."""
        [link] = self.register("w1")
        link.transport.peer_closes()
        self.assertFalse(self.router.model_ready("add"))
        self.register("w2", platform="onnx")
        self.assertEqual(self.metadata()[0], "onnx")
        self.assertTrue(self.router.unregister_model("w2", "add"))
        self.register("w3", platform="tensorflow")
        self.assertEqual(self.metadata()[0], "tensorflow")

    def test_concurrent_registrations_cannot_both_pass(self):
        """While a first registration's worker is being connected to, a
        conflicting one is refused; once it failed, accepted."""
        d = self.start("w1")
        e = self.refused("w2", platform="onnx")
        self.assertEqual(e.code, grpc.StatusCode.FAILED_PRECONDITION)
        fail_attempt(self.reactor, 0)  # w1's socket is not there
        self.accepted = 1
        self.failureResultOf(d)
        self.assertEqual(self.api._pending, {})
        self.register("w2", platform="onnx")
        self.assertEqual(self.metadata()[0], "onnx")

    def test_refusal_logged_once_per_worker_and_reason(self):
        self.register("w1")
        for _ in range(5):
            self.refused("rogue", platform="onnx")
        self.refused("rogue2", platform="onnx")
        self.refused("rogue", "x" * 300)
        logged = [(e["worker"], e["status"]) for e in self.events]
        self.assertEqual(logged, [("rogue", "FAILED_PRECONDITION"), ("rogue2", "FAILED_PRECONDITION"),
                                  ("rogue", "INVALID_ARGUMENT")])

    def test_remembered_refusals_bounded(self):
        self.patch(management, "MAX_REMEMBERED_REFUSALS", 3)
        for i in range(10):
            self.refused("w%d" % i, "x" * 300)
        self.assertEqual(len(self.api._refusals), 3)
        self.assertEqual(len(self.events), 10)


class ScopingTests(RouterBackedTestCase):
    """A worker id is bound to the key of the process that registered it."""

    def heartbeat(self, worker_id, key):
        return self.api.Heartbeat(_m.HeartbeatRequest(worker_id=worker_id, model_names=["add"],
                                                      worker_key=key), 10.0).healthy

    def unregister(self, worker_id, key):
        return self.api.UnregisterModel(_m.UnregisterModelRequest(model_name="add", worker_id=worker_id,
                                                                  worker_key=key), 10.0)

    def test_key_required(self):
        e = self.refused("w1", worker_key="")
        self.assertEqual((e.code, e.message), (grpc.StatusCode.INVALID_ARGUMENT, "worker_key is required"))

    def test_other_key_cannot_withdraw_heartbeat_or_take_over(self):
        self.register("w1")
        for call in (lambda: self.unregister("w1", "stolen"), lambda: self.heartbeat("w1", "stolen"),
                     lambda: self.start("w1", worker_key="stolen")):
            with self.assertRaises(InferenceError) as caught:
                call()
            self.assertEqual(caught.exception.code, grpc.StatusCode.PERMISSION_DENIED)
            self.assertIn("belongs to another live worker process", caught.exception.message)
        self.assertEqual([w.worker_id for w in self.router.registry.resolve("add").workers], ["w1"])
        self.assertTrue(self.heartbeat("w1", "key-w1"))
        self.assertTrue(self.unregister("w1", "key-w1").success)

    def test_key_released_when_the_worker_is_gone(self):
        """Once its worker is lost, a worker id may be registered by a new
        process (a restarted standalone worker with a fixed id); the old
        key then no longer counts."""
        [link] = self.register("w1")
        link.transport.peer_closes()
        self.assertFalse(self.heartbeat("w1", "key-w1"))
        self.register("w1", worker_key="new")
        self.assertTrue(self.heartbeat("w1", "new"))
        with self.assertRaises(InferenceError) as caught:
            self.heartbeat("w1", "key-w1")
        self.assertEqual(caught.exception.code, grpc.StatusCode.PERMISSION_DENIED)


class UnhealthyHeartbeatTests(RouterBackedTestCase):
    def test_unhealthy_worker_evicted_and_replaced(self):
        """A worker whose heartbeat says it can't serve (every handler
        thread stuck) leaves the router, and its supervisor is told."""
        replaced = []
        self.router.on_evicted = lambda *args: replaced.append(args)
        self.register("w1")
        response = self.api.Heartbeat(_m.HeartbeatRequest(
            worker_id="w1", worker_key="key-w1", unhealthy="all 4 handler threads stuck"), 10.0)
        self.assertFalse(response.healthy)
        self.assertNotIn("w1", self.router.workers)
        self.assertEqual(replaced, [("w1", "unix:///tmp/w1.sock", "unhealthy: all 4 handler threads stuck")])
        self.assertIn("reports itself", self.events[-1]["log_format"])


class CapTests(RouterBackedTestCase):
    def assertRefused(self, code, text, *args, **fields):
        e = self.refused(*args, **fields)
        self.assertEqual(e.code, code)
        self.assertIn(text, e.message)
        self.assertLess(len(e.message), 400)
        return e

    def test_lengths(self):
        limit = management.MAX_NAME_BYTES
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        self.assertRefused(invalid, "model name is %d bytes, more than the %d allowed" % (2 ** 20, limit),
                           "w1", "n" * 2 ** 20)
        self.assertRefused(invalid, "model name is %d bytes" % (2 * (limit // 2 + 1)),
                           "w1", "\u00e9" * (limit // 2 + 1))
        self.assertRefused(invalid, "model version is", "w1", "add", "9" * (limit + 1))
        self.assertRefused(invalid, "worker_id is", "w" * (limit + 1))
        self.assertRefused(invalid, "platform is", "w1", platform="p" * (limit + 1))
        self.assertRefused(invalid, "input tensor name is", "w1", inputs=[spec("a" * (limit + 1))])
        self.assertRefused(invalid, "257 outputs, more than the 256 allowed", "w1",
                           outputs=[spec("o%d" % i) for i in range(257)])
        self.assertRefused(invalid, "has 65 dimensions", "w1", inputs=[spec("a", shape=[1] * 65)])
        self.assertEqual(self.router.workers, {})
        # At the limits: accepted.
        self.register("w" * limit, "n" * limit, "9" * limit, inputs=[spec("i%d" % i) for i in range(256)])

    def test_models_per_worker(self):
        self.patch(management, "MAX_MODELS_PER_WORKER", 2)
        self.register("w1", "a")
        d = self.start("w1", "b", platform="x")  # in flight: counted too
        self.assertRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, "already serves 2 models", "w1", "c")
        self.successResultOf(d)
        self.register("w1", "a")  # what it serves already: a re-registration
        self.register("w2", "c")  # another worker's count
        self.assertTrue(self.router.unregister_model("w1", "a"))
        self.register("w1", "c")

    def test_workers_in_all(self):
        """Past MAX_WORKERS a new worker id is refused before any connection
        is opened to it; known ids still re-register."""
        self.patch(management, "MAX_WORKERS", 2)
        self.register("w1", "a")
        d = self.start("w2", "b")  # being connected to: counted
        self.assertRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, "already has 2 workers", "w3", "c")
        [link] = self.accept()
        self.successResultOf(d)
        self.register("w1", "d")
        self.assertEqual(sorted(self.router.workers), ["w1", "w2"])
        self.refused("w3", "c")
        link.transport.peer_closes()  # w2 is lost: its place is free
        self.register("w3", "c")

    def test_registration_rate(self):
        """A token bucket on the reactor's clock, over all workers."""
        self.patch(management, "REGISTRATIONS_PER_SECOND", 2.0)
        self.patch(management, "REGISTRATION_BURST", 3)
        for i in range(3):
            self.register("w%d" % i)
        self.assertRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, "more than 2 registrations a second", "w1")
        self.reactor.advance(0.5)
        self.register("w1")
        self.refused("w2")
        self.reactor.advance(10)
        for i in range(3):
            self.register("w%d" % i)
        self.refused("w2")
        self.assertEqual([ev["worker"] for ev in self.events], ["w1", "w2"])
