"""Tests for the worker's side of supervision: anyserve_tw.worker.supervised
(the lifeline, the status pipe) and the shutdown guard and registration
report of anyserve_tw.worker.main.  Real processes: tests/test_lifecycle.py."""
import os
import signal
import subprocess
import sys
import tempfile
import threading

from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire import supervision
from anyserve_tw.worker import main, supervised
from anyserve_tw.worker.supervised import Supervised, tie_to_supervisor


def dead_pid():
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


class Recorder:
    """Stands in for os.kill, os._exit and the stderr lines."""

    def __init__(self):
        self.calls = []
        self.said = []
        self.done = threading.Event()

    def say(self, message):
        self.said.append(message)

    def kill(self, pid, signum):
        self.calls.append(("kill", pid, signum))

    def exit(self, code):
        self.calls.append(("exit", code))
        self.done.set()


class SupervisedTests(SynchronousTestCase):
    def pipe(self):
        r, w = os.pipe()
        self.addCleanup(_close, r)
        self.addCleanup(_close, w)
        return r, w

    def test_standalone_without_the_variable(self):
        self.assertIsNone(Supervised.from_environ({}))
        self.assertIsNone(Supervised.from_environ({supervision.ENV_SUPERVISOR_PID: "x"}))

    def test_from_environ_takes_pipes_only(self):
        r, w = self.pipe()
        with tempfile.TemporaryFile() as f:
            tie = Supervised.from_environ({
                supervision.ENV_SUPERVISOR_PID: "12",
                supervision.ENV_LIFELINE_FD: str(r),
                supervision.ENV_STATUS_FD: str(f.fileno()),  # a file, not a pipe: ignored
            })
        self.assertEqual((tie.supervisor_pid, tie.lifeline_fd, tie.status_fd), (12, r, None))
        self.assertFalse(os.get_inheritable(r))  # a handler's subprocess must not hold it

    def test_lifeline_end_of_file_stops_then_exits(self):
        r, w = self.pipe()
        recorder = Recorder()
        # Not our parent's pid, so no parent-death signal is set on the test process.
        tie = Supervised(os.getpid(), lifeline_fd=r, grace=0.01, kill=recorder.kill, exit=recorder.exit, say=recorder.say)
        tie.start()
        self.assertFalse(recorder.done.wait(0.2))
        self.assertEqual(recorder.calls, [])  # the ingress is alive
        os.close(w)
        self.assertTrue(recorder.done.wait(10))
        self.assertEqual(recorder.calls, [("kill", os.getpid(), signal.SIGTERM), ("exit", 1)])
        self.assertEqual(recorder.said, [
            "the ingress (pid %d) is gone: shutting down" % os.getpid(),
            "still running 0.01s after the ingress went: exiting now",
        ])

    def test_lifeline_already_broken_at_start(self):
        """The ingress died before the worker looked: no race, no pid needed."""
        r, w = self.pipe()
        os.close(w)
        recorder = Recorder()
        Supervised(os.getpid(), lifeline_fd=r, grace=0, kill=recorder.kill, exit=recorder.exit, say=recorder.say).start()
        self.assertTrue(recorder.done.wait(10))
        self.assertEqual(recorder.calls[0][0], "kill")

    def test_no_lifeline_and_the_supervisor_is_dead(self):
        recorder = Recorder()
        pid = dead_pid()
        Supervised(pid, kill=recorder.kill, exit=recorder.exit, say=recorder.say).start()
        self.assertEqual(recorder.calls, [("exit", 1)])
        self.assertEqual(recorder.said, ["the ingress that started this worker (pid %d) is gone: exiting" % pid])

    def test_no_lifeline_and_the_supervisor_alive_but_not_the_parent(self):
        recorder = Recorder()
        Supervised(os.getpid(), kill=recorder.kill, exit=recorder.exit, say=recorder.say).start()
        self.assertEqual(recorder.calls, [])
        self.assertIn("will not notice if the ingress dies", recorder.said[0])

    def test_tie_to_supervisor_starts_once(self):
        """So the SDK may call it early and run() again."""
        self.patch(supervised, "_tie", [])
        r, w = self.pipe()
        recorder = Recorder()
        environ = {supervision.ENV_SUPERVISOR_PID: str(os.getpid()), supervision.ENV_LIFELINE_FD: str(r)}
        first = tie_to_supervisor(environ, grace=0, kill=recorder.kill, exit=recorder.exit, say=recorder.say)
        self.assertIs(tie_to_supervisor(environ), first)
        self.assertTrue(first.watcher.is_alive())
        os.close(w)
        self.assertTrue(recorder.done.wait(10))
        self.assertEqual([c[0] for c in recorder.calls], ["kill", "exit"])  # one watcher

    def test_tie_to_supervisor_standalone(self):
        self.patch(supervised, "_tie", [])
        self.assertIsNone(tie_to_supervisor({}))
        self.assertIsNone(tie_to_supervisor({}))

    def test_report_writes_status_lines(self):
        r, w = self.pipe()
        tie = Supervised(1, status_fd=w)
        tie.report(supervision.RUNNING)
        tie.report(supervision.REGISTERED)
        self.assertEqual(os.read(r, 100), b"running\nregistered\n")

    def test_report_to_a_gone_ingress_is_quiet(self):
        r, w = os.pipe()
        os.close(r)
        self.addCleanup(os.close, w)
        Supervised(1, status_fd=w).report(supervision.REGISTERED)  # EPIPE: ignored
        Supervised(1).report(supervision.REGISTERED)  # no status pipe at all


def _close(fd):
    try:
        os.close(fd)
    except OSError:
        pass


class FakeReactor(Clock):
    def __init__(self):
        super().__init__()
        self.stops = 0
        self.stopped = False

    def stop(self):
        if self.stopped:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        self.stopped = True
        self.stops += 1

    def callFromThread(self, f, *args):
        f(*args)


class ShutdownTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        self.patch(main, "log", Logger(observer=self.events.append))
        self.reactor = FakeReactor()
        self.shutdown = main.Shutdown(self.reactor)

    def test_second_sigterm_does_not_stop_again(self):
        """Twisted's handler called reactor.stop() per signal: ReactorNotRunning."""
        self.shutdown.signalled(signal.SIGTERM)
        self.shutdown.signalled(signal.SIGTERM)
        self.shutdown.signalled(signal.SIGINT)
        self.assertEqual(self.reactor.stops, 1)
        self.assertEqual([formatEvent(e) for e in self.events], [
            "received SIGTERM, shutting down",
            "received SIGTERM again: already shutting down",
            "received SIGINT again: already shutting down",
        ])

    def test_a_failed_start_then_a_signal(self):
        self.shutdown.stop()
        self.shutdown.signalled(signal.SIGTERM)
        self.assertEqual(self.reactor.stops, 1)

    def test_reactor_stopped_by_someone_else(self):
        self.reactor.stop()
        self.shutdown.signalled(signal.SIGTERM)  # no ReactorNotRunning
        self.assertTrue(self.shutdown.requested)


class FakeRegistration:
    registered = False


class ReportRegistrationTests(SynchronousTestCase):
    def test_reports_once_when_first_registered(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        clock, registration = Clock(), FakeRegistration()
        loop = main.report_registration(clock, registration, Supervised(1, status_fd=w), interval=0.1)
        clock.advance(0.5)
        os.set_blocking(r, False)
        self.assertRaises(BlockingIOError, os.read, r, 100)
        registration.registered = True
        clock.advance(0.1)
        self.assertEqual(os.read(r, 100), b"registered\n")
        self.assertFalse(loop.running)
