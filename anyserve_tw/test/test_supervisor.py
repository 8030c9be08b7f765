"""Tests for anyserve_tw.ingress.supervisor on a fake clock: exit logging,
the crash-loop back-off, status pipe, output relay and ``replace``.  (Real
processes: anyserve_tw.test.test_servicetree and tests/test_lifecycle.py.)"""
import signal

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.supervisor import OutputLines, WorkerSupervisor, describe_exit
from anyserve_tw.wire import supervision


class FakeProcess:
    """What the supervisor uses of a process transport."""

    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)


class FakeProcessReactor(Clock):
    """A clock that records spawned processes and gives each a fake pid."""

    def __init__(self):
        super().__init__()
        self.spawned = []  # (name, env, childFDs)
        self.fail = False
        self._pid = 1000

    def spawnProcess(self, protocol, executable, args, env=None, path=None, uid=None, gid=None,
                     childFDs=None, **kw):
        if self.fail:
            raise OSError("cannot fork")
        self._pid += 1
        self.spawned.append((protocol.name, env, childFDs))
        transport = FakeProcess(self._pid)
        protocol.makeConnection(transport)
        return transport


def exited(code):
    return Failure(error.ProcessDone(None) if code == 0 else error.ProcessTerminated(exitCode=code))


def killed(signum):
    return Failure(error.ProcessTerminated(signal=signum))


class SupervisorTestCase(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeProcessReactor()
        self.sup = WorkerSupervisor(self.reactor, ["/x/model.py"], 1, "127.0.0.1:1", 0.5,
                                    socket_dir="/nonexistent")
        self.events = []
        self.sup.log = Logger(namespace="supervisor", observer=self.events.append)
        self.sup.startService()

    def starts(self, name="model-0"):
        return [s for s in self.reactor.spawned if s[0] == name]

    def proto(self, name="model-0"):
        return self.sup.protocols[name]

    def status(self, *lines, name="model-0"):
        self.proto(name).childDataReceived(supervision.STATUS_FD, b"".join(l + b"\n" for l in lines))

    def end(self, reason, name="model-0"):
        self.proto(name).processEnded(reason)

    def messages(self):
        return [formatEvent(e) for e in self.events]

    def last(self):
        return self.messages()[-1]

    def run_for(self, seconds, reason, registered=True):
        """The current process runs ``seconds``, then ends with ``reason``;
        returns the delay before the supervisor started it again."""
        if registered:
            self.status(supervision.RUNNING, supervision.REGISTERED)
        self.reactor.advance(seconds)
        before = len(self.starts())
        self.end(reason)
        self.reactor.advance(0)
        waited = 0.0
        while len(self.starts()) == before:
            self.assertLess(waited, 3600, "never restarted")
            self.reactor.advance(0.25)
            waited += 0.25
        return waited


class BackoffTests(SupervisorTestCase):
    def test_slow_crash_loop_backs_off_doubling_to_the_cap(self):
        """A worker that dies 3 s after each start (registered each time) is
        not restarted every 3 s forever: 1, 2, 4, ... 60, 60 s."""
        delays = [self.run_for(3, exited(1)) for _ in range(9)]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])

    def test_a_healthy_run_restarts_at_once_and_resets_the_delay(self):
        for _ in range(4):
            self.run_for(3, killed(signal.SIGKILL))
        self.assertEqual(self.sup.delay["model-0"], 16)
        self.assertEqual(self.run_for(30, killed(signal.SIGKILL)), 0)
        self.assertIn("restarting now", self.last())
        self.assertEqual(self.run_for(3, exited(1)), 1)

    def test_a_long_run_that_never_registered_is_a_crash(self):
        self.assertEqual(self.run_for(100, exited(1), registered=False), 1)
        self.assertEqual(self.run_for(100, exited(1), registered=False), 2)

    def test_each_worker_has_its_own_delay(self):
        sup = WorkerSupervisor(self.reactor, ["/x/model.py"], 2, "127.0.0.1:1", 0.5,
                               socket_dir="/nonexistent")
        sup.log = Logger(observer=lambda e: None)
        sup.startService()
        for _ in range(3):
            sup.protocols["model-0"].processEnded(exited(1))
            self.reactor.advance(60)
        self.assertEqual((sup.delay["model-0"], sup.delay["model-1"]), (8, 1))

    def test_constants(self):
        self.assertEqual((WorkerSupervisor.threshold, WorkerSupervisor.minRestartDelay,
                          WorkerSupervisor.maxRestartDelay), (30, 1, 60))

    def test_restart_all_restarts_at_once_without_counting_a_crash(self):
        self.run_for(3, exited(1))
        self.assertEqual(self.sup.delay["model-0"], 2)
        self.sup.restartAll()
        self.assertEqual(self.proto().transport.signals, ["TERM"])
        self.end(exited(0))
        self.reactor.advance(0)
        self.assertEqual(len(self.starts()), 3)  # at once
        self.assertEqual(self.sup.delay["model-0"], 2)
        self.assertNotIn("before registering", self.last())

    def test_a_worker_that_cannot_be_spawned_is_retried_with_back_off(self):
        self.sup.stopProcess("model-0")
        self.reactor.fail = True
        self.end(exited(0))  # the expected exit restarts at once, and fails
        self.reactor.advance(0)
        self.assertIn("cannot start worker model-0", self.messages())
        self.assertIn("did not start", self.last())
        self.assertIn("restarting in 1s", self.last())
        self.reactor.fail = False
        self.reactor.advance(1)
        self.assertIn("model-0", self.sup.protocols)


class ExitLogTests(SupervisorTestCase):
    def test_exit_code_and_signal(self):
        pid = self.proto().pid
        self.status(supervision.RUNNING, supervision.REGISTERED)
        self.reactor.advance(2.5)
        self.end(exited(1))
        self.assertEqual(self.last(), "worker model-0 (pid %d) exited with code 1 (ran 2.5s; restarting in 1s)" % pid)
        self.assertEqual(self.events[-1]["log_level"].name, "warn")
        self.reactor.advance(1)
        pid = self.proto().pid
        self.status(supervision.REGISTERED)
        self.end(killed(signal.SIGKILL))
        self.assertEqual(self.last(), "worker model-0 (pid %d) killed by SIGKILL (ran 0.0s; restarting in 2s)" % pid)

    def test_a_script_that_never_calls_run(self):
        """Exit 0 with no word on the status pipe: the script never called app.run()."""
        pid = self.proto().pid
        self.end(exited(0))
        self.assertEqual(
            self.last(),
            "worker model-0 (pid %d) exited with code 0 before registering: does the script call "
            "app.run()? (ran 0.0s; restarting in 1s)" % pid)
        self.reactor.advance(1)
        self.end(exited(0))
        self.assertIn("restarting in 2s", self.last())  # backed off like a crash

    def test_exit_0_after_run_but_before_registering_gives_no_hint(self):
        self.status(supervision.RUNNING)
        self.end(exited(0))
        self.assertIn("exited with code 0 before registering (ran", self.last())

    def test_a_crash_before_registering(self):
        self.status(supervision.RUNNING)
        self.end(exited(3))
        self.assertIn("exited with code 3 before registering (ran", self.last())

    def test_exits_while_stopping_are_logged_as_info_and_not_restarted(self):
        first = self.proto()
        self.status(supervision.RUNNING, supervision.REGISTERED)
        self.sup.stopService()
        self.assertEqual(first.transport.signals, ["TERM"])
        self.end(exited(0))
        self.assertEqual(self.last(), "worker model-0 (pid %d) exited with code 0" % first.pid)
        self.assertEqual(self.events[-1]["log_level"].name, "info")
        self.reactor.advance(120)
        self.assertEqual(len(self.starts()), 1)

    def test_a_worker_killed_after_the_kill_time_says_so(self):
        proto = self.proto()
        self.status(supervision.REGISTERED)
        self.sup.stopService()
        self.reactor.advance(self.sup.killTime)
        self.assertEqual(proto.transport.signals, ["TERM", "KILL"])
        proto.processEnded(killed(signal.SIGKILL))
        self.assertEqual(self.last(), "worker model-0 (pid %d) killed by SIGKILL (still running 10s after "
                                      "SIGTERM)" % proto.pid)

    def test_describe_exit(self):
        self.assertEqual(describe_exit(error.ProcessDone(None)), "exited with code 0")
        self.assertEqual(describe_exit(error.ProcessTerminated(exitCode=2)), "exited with code 2")
        self.assertEqual(describe_exit(error.ProcessTerminated(signal=15)), "killed by SIGTERM")
        self.assertEqual(describe_exit(error.ProcessTerminated(signal=9)), "killed by SIGKILL")
        self.assertEqual(describe_exit(error.ProcessTerminated(signal=200)), "killed by signal 200")


class StatusPipeTests(SupervisorTestCase):
    def test_spawned_with_lifeline_and_status_pipes(self):
        import os

        [(name, env, fds)] = self.starts()
        self.assertEqual(fds, {0: "w", 1: "r", 2: "r", supervision.LIFELINE_FD: "w",
                               supervision.STATUS_FD: "r"})
        self.assertEqual(env[supervision.ENV_SUPERVISOR_PID], str(os.getpid()))
        self.assertEqual(env[supervision.ENV_LIFELINE_FD], str(supervision.LIFELINE_FD))
        self.assertEqual(env[supervision.ENV_STATUS_FD], str(supervision.STATUS_FD))

    def test_status_lines_in_pieces(self):
        proto = self.proto()
        proto.childDataReceived(supervision.STATUS_FD, b"runn")
        self.assertFalse(proto.called_run)
        proto.childDataReceived(supervision.STATUS_FD, b"ing\nregis")
        self.assertTrue(proto.called_run)
        self.assertFalse(self.sup.all_registered())
        proto.childDataReceived(supervision.STATUS_FD, b"tered\n")
        self.assertTrue(proto.registered)
        self.assertTrue(self.sup.all_registered())

    def test_unknown_or_endless_status_is_not_buffered(self):
        proto = self.proto()
        proto.childDataReceived(supervision.STATUS_FD, b"x" * 100000)
        self.assertEqual(proto._status, b"")
        proto.childDataReceived(supervision.STATUS_FD, b"hello\nregistered\n")
        self.assertTrue(proto.registered)

    def test_all_registered_needs_every_worker_running(self):
        self.status(supervision.REGISTERED)
        self.assertTrue(self.sup.all_registered())
        self.end(exited(1))
        self.assertFalse(self.sup.all_registered())
        self.reactor.advance(1)
        self.assertFalse(self.sup.all_registered())  # a new process, not registered yet

    def test_output_is_relayed_line_by_line(self):
        proto = self.proto()
        proto.childDataReceived(1, b"one\ntw")
        proto.childDataReceived(2, b"err\n")
        proto.childDataReceived(1, b"o\nthree")
        self.end(exited(0))
        lines = [(e["stream"], formatEvent(e)) for e in self.events if "stream" in e]
        self.assertEqual(lines, [("stdout", "[model-0] one"), ("stderr", "[model-0] err"),
                                 ("stdout", "[model-0] two"), ("stdout", "[model-0] three")])


class ReplaceTests(SupervisorTestCase):
    def test_replace_stops_the_worker_and_counts_a_crash(self):
        self.status(supervision.REGISTERED)
        self.reactor.advance(100)  # a long healthy run, then it went silent
        proto = self.proto()
        self.assertTrue(self.sup.replace("model-0-%d" % proto.pid, "unix:///nonexistent/model-0.sock",
                                         "no heartbeat for 6s"))
        self.assertIn("replacing worker model-0 (pid %d): no heartbeat for 6s" % proto.pid, self.messages())
        self.assertEqual(proto.transport.signals, ["TERM"])
        self.reactor.advance(self.sup.killTime)
        self.assertEqual(proto.transport.signals, ["TERM", "KILL"])
        proto.processEnded(killed(signal.SIGKILL))
        self.assertIn("killed by SIGKILL (still running 10s after SIGTERM) (ran 110.0s; restarting in 1s)",
                      self.last())
        self.reactor.advance(1)
        self.assertEqual(len(self.starts()), 2)
        self.assertEqual(self.sup.delay["model-0"], 2)

    def test_replace_ignores_workers_that_are_not_ours(self):
        ours, address = "model-0-%d" % self.proto().pid, "unix:///nonexistent/model-0.sock"
        self.assertFalse(self.sup.replace(ours, "unix:///elsewhere/model-0.sock", "why"))
        self.assertFalse(self.sup.replace(ours, "127.0.0.1:5000", "why"))
        self.assertFalse(self.sup.replace("model-0-1", address, "why"))  # a stranger at our address
        self.assertFalse(self.sup.replace("model-0", address, "why"))
        self.assertEqual(self.proto().transport.signals, [])


class NoteRegisteredTests(SupervisorTestCase):
    def test_the_routers_word_counts_before_the_status_report(self):
        proto = self.proto()
        self.assertFalse(self.sup.all_registered())
        self.sup.note_registered("model-0-1")  # not ours: another pid
        self.assertFalse(self.sup.all_registered())
        self.sup.note_registered("model-0-%d" % proto.pid)
        self.assertTrue(self.sup.all_registered())


class OutputLinesTests(SynchronousTestCase):
    def setUp(self):
        self.lines = []
        self.out = OutputLines(self.lines.append, max_line=10)

    def test_lines_across_chunks(self):
        self.out.feed(b"ab")
        self.out.feed(b"c\n\nde\nf")
        self.assertEqual(self.lines, ["abc", "", "de"])
        self.out.flush()
        self.assertEqual(self.lines, ["abc", "", "de", "f"])

    def test_long_lines_are_cut_not_fatal(self):
        """ProcessMonitor's relay closed the pipe on a line over 16 KiB."""
        self.out.feed(b"0123456789abc")
        self.out.feed(b"def" * 1000)
        self.out.feed(b"ghi\nnext\n" + b"x" * 25)
        self.out.flush()
        self.assertEqual(self.lines, ["0123456789 [line cut]", "next", "xxxxxxxxxx [line cut]"])

    def test_bytes_that_are_not_utf8(self):
        self.out.feed(b"caf\xc3\xa9 \xff\n")
        self.assertEqual(self.lines, ["caf\u00e9 \ufffd"])
