"""Tests for anyserve_tw.worker.failurelog: a model's tracebacks, paced."""
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.worker.failurelog import FailureLog


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FailureLogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = FakeClock()
        self.failures = FailureLog(every=1.0, clock=self.clock)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def fail(self, model):
        try:
            raise ValueError("boom in %s" % model)
        except ValueError:
            return self.failures.failure(model)

    def lines(self):
        return [e["log_format"].format(**e) for e in self.events if "log_failure" in e]

    def test_one_traceback_per_model_per_interval(self):
        self.assertEqual([self.fail("a") for _ in range(5)], [True, False, False, False, False])
        self.assertTrue(self.fail("b"))  # each model its own
        self.clock.now += 0.99
        self.assertFalse(self.fail("a"))
        self.clock.now += 0.01
        self.assertTrue(self.fail("a"))
        self.assertTrue(self.fail("b"))
        self.assertEqual(self.lines(), [
            "model a failed", "model b failed",
            "model a failed (and 5 more time(s) since its last traceback, not logged)",
            "model b failed"])
        logged = [e for e in self.events if "log_failure" in e]
        self.assertEqual({e["log_level"] for e in logged}, {LogLevel.error})
        self.assertEqual(str(logged[0]["log_failure"].value), "boom in a")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 4)

    def test_what_and_a_given_failure(self):
        from twisted.python.failure import Failure

        self.assertTrue(self.failures.failure("m", Failure(KeyError("k")), what="returned junk"))
        self.assertEqual(self.lines(), ["model m returned junk"])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
