"""Tests for anyserve_tw.ingress.management: malformed registrations are refused with
INVALID_ARGUMENT before anything reaches the router; good ones reach it whole."""
import grpc
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import protos
from anyserve_tw.ingress.management import ManagementAPI
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

    def register_model(self, *args, **config):
        self.calls.append((args, config))
        return succeed(True)


class RegisterModelTests(SynchronousTestCase):
    def register(self, **fields):
        router = RecordingRouter()
        request = _m.RegisterModelRequest(
            model_name="cls", model_version="v1", worker_id="w1", worker_address="unix:///tmp/w.sock",
            platform="python", inputs=[_m.TensorSpec(name="x", datatype="FP32", shape=[-1, 4])], **fields)
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
