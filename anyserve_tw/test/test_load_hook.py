"""Tests for ``@app.on_load``: hooks run, in order, before the worker's
services start (so before any model is registered); a failing hook keeps
them from starting."""
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.worker import AnyServe
from anyserve_tw.worker.main import LoadFailed, load_then_start


class Models(Service):
    def __init__(self, events):
        self.events = events
        self.listening = succeed(None)

    def startService(self):
        super().startService()
        self.events.append("started")


def tree(events):
    top = MultiService()
    models = Models(events)
    models.setName("models")
    models.setServiceParent(top)
    return top


class LoadHookTests(SynchronousTestCase):
    def setUp(self):
        self.app = AnyServe()
        self.events = []

        @self.app.model("m")
        def handler(request):
            return {}

    def test_hooks_run_in_order_before_the_services_start(self):
        later = Deferred()

        @self.app.on_load
        def first():
            self.events.append("first")

        @self.app.on_load
        async def second():
            self.events.append("second")
            await later
            self.events.append("second done")

        @self.app.on_load
        def third():
            self.events.append("third")
            return succeed(None)

        top = tree(self.events)
        done = load_then_start(self.app, top)
        self.assertEqual(self.events, ["first", "second"])
        self.assertFalse(top.running)
        later.callback(None)
        self.assertEqual(self.events, ["first", "second", "second done", "third", "started"])
        self.successResultOf(done)

    def test_the_decorator_returns_the_hook(self):
        def hook():
            pass

        self.assertIs(self.app.on_load(hook), hook)
        self.assertEqual(self.app.load_hooks, [hook])

    def test_no_hooks_start_at_once(self):
        top = tree(self.events)
        self.successResultOf(load_then_start(self.app, top))
        self.assertEqual(self.events, ["started"])

    def test_a_failing_hook_starts_nothing(self):
        @self.app.on_load
        def broken():
            raise OSError("weights not found")

        @self.app.on_load
        def never():
            self.events.append("never")

        top = tree(self.events)
        failure = self.failureResultOf(load_then_start(self.app, top), LoadFailed)
        self.assertIn("weights not found", str(failure.value))
        self.assertEqual(self.events, [])
        self.assertFalse(top.running)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_a_stop_requested_during_loading_starts_nothing(self):
        """A SIGTERM that arrived while a plain hook held the loop is handled
        in the turn after the hooks: the services then never start."""
        clock = Clock()
        stopping = []

        @self.app.on_load
        def slow():
            self.events.append("loaded")

        top = tree(self.events)
        d = load_then_start(self.app, top, clock, lambda: bool(stopping))
        self.assertEqual(self.events, ["loaded"])
        stopping.append(True)  # the signal, handled in the next turn
        clock.advance(0)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.events, ["loaded"])
        self.assertFalse(top.running)

    def test_with_a_clock_the_services_start_a_turn_after_the_hooks(self):
        clock = Clock()
        self.app.on_load(lambda: self.events.append("loaded"))
        top = tree(self.events)
        d = load_then_start(self.app, top, clock, lambda: False)
        self.assertEqual(self.events, ["loaded"])
        clock.advance(0)
        self.assertEqual(self.events, ["loaded", "started"])
        self.successResultOf(d)
