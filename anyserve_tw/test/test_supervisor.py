"""Tests for anyserve_tw.ingress.supervisor on a fake clock: exit logging,
the crash-loop back-off, status pipe, output relay, ``replace``, recycling,
the interpreter, math threads and GPUs.  (Real
processes: anyserve_tw.test.test_servicetree and tests/test_lifecycle.py.)"""
import signal

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.supervisor import (
    MATH_THREAD_VARIABLES, SHEBANG, OutputLines, WorkerSupervisor, available_cores, describe_exit,
    resident_bytes, shebang_of,
)
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
        self.argvs = []  # (executable, args) of each spawn
        self.fail = False
        self._pid = 1000

    def spawnProcess(self, protocol, executable, args, env=None, path=None, uid=None, gid=None,
                     childFDs=None, **kw):
        if self.fail:
            raise OSError("cannot fork")
        self._pid += 1
        self.spawned.append((protocol.name, env, childFDs))
        self.argvs.append((executable, list(args)))
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


class RecycleTestCase(SupervisorTestCase):
    """One worker, recycled after 100 requests or above 50 MB."""

    def setUp(self):
        self.reactor = FakeProcessReactor()
        self.sup = WorkerSupervisor(self.reactor, ["/x/model.py"], 1, "127.0.0.1:1", 0.5,
                                    socket_dir="/nonexistent", max_requests=100, max_rss_mb=50)
        self.served = {}
        self.drained = []
        self.sup.requests_served = lambda worker_id: self.served.get(worker_id, 0)
        self.sup.drain = self.drained.append
        self.rss = {}
        import anyserve_tw.ingress.supervisor as module
        self.patch(module, "resident_bytes", lambda pid: self.rss.get(pid))
        self.events = []
        self.sup.log = Logger(namespace="supervisor", observer=self.events.append)
        self.sup.startService()
        self.addCleanup(self.sup.stopService)
        self.old = self.proto()
        self.status(supervision.RUNNING, supervision.REGISTERED)

    def address(self, proto):
        return "unix://" + proto.socket


class RecycleTests(RecycleTestCase):
    def test_replacement_first_then_drain_then_sigterm(self):
        old = self.old
        self.assertEqual(old.worker_id, "model-0-%d" % old.pid)
        self.sup.request_limit(old.worker_id, self.address(old), 100)
        self.assertIn("recycling worker model-0 (pid %d): served 100 requests (--worker-max-requests 100); "
                      "starting its replacement" % old.pid, self.messages())
        # The replacement runs beside it, on a socket of its own ...
        new = self.proto()
        self.assertIsNot(new, old)
        self.assertEqual(new.socket, "/nonexistent/model-0-r1.sock")
        self.assertEqual(self.reactor.spawned[-1][1]["ANYSERVE_SOCKET"], new.socket)
        self.assertEqual(new.worker_id, "model-0-r1-%d" % new.pid)
        # ... and until it has registered every model the old one serves on.
        self.assertEqual((old.transport.signals, self.drained), ([], []))
        self.assertTrue(self.sup.all_registered())  # no dip in readiness
        self.sup.note_registered(new.worker_id)  # its first model: not enough
        self.assertEqual(self.drained, [])
        self.status(supervision.RUNNING, supervision.REGISTERED)
        self.assertEqual(self.drained, [old.worker_id])
        self.assertEqual(old.transport.signals, ["TERM"])
        self.assertTrue(self.sup.all_registered())
        old.processEnded(exited(0))
        self.assertIn("recycled worker model-0 (pid %d) exited with code 0" % old.pid, self.last())
        self.assertEqual(new.transport.signals, [])
        self.assertIs(self.proto(), new)
        self.assertEqual(len(self.starts()), 2)
        self.reactor.advance(self.sup.killTime)
        self.assertEqual(old.transport.signals, ["TERM"])  # no SIGKILL after a clean exit

    def test_a_worker_that_does_not_drain_is_killed(self):
        old = self.old
        self.sup.recycle("model-0", "test")
        self.status(supervision.REGISTERED)
        self.reactor.advance(self.sup.killTime)
        self.assertEqual(old.transport.signals, ["TERM", "KILL"])
        old.processEnded(killed(signal.SIGKILL))
        self.assertIn("killed by SIGKILL (still running 10s after SIGTERM)", self.last())
        self.assertEqual(len(self.starts()), 2)  # the recycled one is not restarted

    def test_the_periodic_check_counts_requests(self):
        self.served[self.old.worker_id] = 99
        self.reactor.advance(self.sup.check_interval)
        self.assertEqual(len(self.starts()), 1)
        self.served[self.old.worker_id] = 130
        self.reactor.advance(self.sup.check_interval)
        self.assertEqual(len(self.starts()), 2)
        self.assertIn("served 130 requests", " ".join(self.messages()))

    def test_the_periodic_check_reads_resident_memory(self):
        self.rss[self.old.pid] = 50 * 1024 * 1024
        self.reactor.advance(self.sup.check_interval)
        self.assertEqual(len(self.starts()), 1)
        self.rss[self.old.pid] = 80 * 1024 * 1024
        self.reactor.advance(self.sup.check_interval)
        self.assertEqual(len(self.starts()), 2)
        self.assertIn("resident memory 80 MB is above --worker-max-rss 50 MB before serving any request "
                      "(is the limit below a fresh worker's size?)", " ".join(self.messages()))
        # Once it has served, no such hint.
        self.status(supervision.REGISTERED)
        new = self.proto()
        self.served[new.worker_id] = 5
        self.rss[new.pid] = 60 * 1024 * 1024
        self.reactor.advance(self.sup.check_interval)
        self.assertTrue(self.messages()[-1].endswith("above --worker-max-rss 50 MB; starting its replacement"),
                        self.messages()[-1])

    def test_not_before_it_registered_nor_twice_at_once(self):
        self.assertTrue(self.sup.recycle("model-0", "first"))
        self.assertFalse(self.sup.recycle("model-0", "again"))  # its replacement is starting
        self.assertFalse(self.sup.recycle("model-0", "again"))
        self.assertEqual(len(self.starts()), 2)
        self.status(supervision.REGISTERED)
        self.assertTrue(self.sup.recycle("model-0", "the replacement's turn"))

    def test_one_recycle_at_a_time(self):
        sup = WorkerSupervisor(self.reactor, ["/x/two.py"], 2, "127.0.0.1:1", 0.5,
                               socket_dir="/nonexistent", max_requests=100)
        sup.log = Logger(observer=lambda e: None)
        sup.requests_served = lambda worker_id: 0 if "-r1-" in worker_id else 100  # replacements: 0
        sup.startService()
        self.addCleanup(sup.stopService)
        for name in ("two-0", "two-1"):
            sup.protocols[name].childDataReceived(supervision.STATUS_FD, b"registered\n")
        started = lambda: [s[0] for s in self.reactor.spawned if s[0].startswith("two")]
        self.reactor.advance(sup.check_interval)
        self.assertEqual(started(), ["two-0", "two-1", "two-0"])
        self.reactor.advance(sup.check_interval)
        self.assertEqual(len(started()), 3)  # two-1 waits for two-0's replacement
        sup.protocols["two-0"].childDataReceived(supervision.STATUS_FD, b"registered\n")
        self.reactor.advance(sup.check_interval)
        self.assertEqual(started(), ["two-0", "two-1", "two-0", "two-1"])

    def test_requests_of_strangers_or_under_the_limit_are_ignored(self):
        old = self.old
        self.sup.request_limit(old.worker_id, "unix:///elsewhere.sock", 100)
        self.sup.request_limit("model-0-1", self.address(old), 100)
        self.sup.request_limit(old.worker_id, self.address(old), 99)
        self.assertEqual(len(self.starts()), 1)

    def test_a_replacement_that_dies_leaves_the_old_one_serving(self):
        old = self.old
        self.sup.recycle("model-0", "test")
        new = self.proto()
        new.processEnded(exited(1))
        self.assertIn("recycling worker model-0 (pid %d) abandoned: its replacement (pid %d) exited "
                      "with code 1 before registering" % (old.pid, new.pid), self.last())
        self.assertIs(self.proto(), old)
        self.assertEqual(old.transport.signals, [])
        self.reactor.advance(60)
        self.assertEqual(len(self.starts()), 2)  # no restart of the replacement
        self.assertTrue(self.sup.all_registered())
        self.assertTrue(self.sup.recycle("model-0", "later"))  # tried again (back-off: 1 s)
        self.assertEqual(self.proto().socket, "/nonexistent/model-0-r1.sock")

    def test_a_replacement_that_never_registers_is_stopped(self):
        """One stuck before registering (a load hook that never ends) does
        not stall recycling: it is stopped, and the old worker serves on."""
        old = self.old
        self.sup.recycle("model-0", "test")
        new = self.proto()
        self.reactor.advance(self.sup.replacement_timeout - self.sup.check_interval)
        self.assertEqual(new.transport.signals, [])
        self.reactor.advance(self.sup.check_interval)
        self.assertEqual(new.transport.signals, ["TERM"])
        self.assertIn("has not registered in %ds: stopping it" % self.sup.replacement_timeout,
                      " ".join(self.messages()))
        new.processEnded(exited(0))
        self.assertIn("recycling worker model-0 (pid %d) abandoned" % old.pid, self.last())
        self.assertIs(self.proto(), old)
        self.assertEqual(old.transport.signals, [])

    def test_a_failed_recycle_waits_out_the_back_off(self):
        self.sup.recycle("model-0", "test")
        self.proto().processEnded(exited(1))
        self.assertFalse(self.sup.recycle("model-0", "at once"))
        self.reactor.advance(1)
        self.assertTrue(self.sup.recycle("model-0", "a second later"))

    def test_the_old_one_dying_meanwhile(self):
        old = self.old
        self.sup.recycle("model-0", "test")
        new = self.proto()
        old.processEnded(killed(signal.SIGSEGV))
        self.assertIn("killed by SIGSEGV while being recycled", self.last())
        self.assertIs(self.proto(), new)
        self.status(supervision.REGISTERED)
        self.assertEqual(self.drained, [])  # nothing left to drain

    def test_a_replacement_without_status_pipe_is_taken_at_the_routers_word(self):
        old = self.old
        self.sup.recycle("model-0", "test")
        new = self.proto()
        self.sup.note_registered(new.worker_id)
        self.reactor.advance(self.sup.threshold)
        self.assertEqual(self.drained, [old.worker_id])
        self.assertEqual(old.transport.signals, ["TERM"])

    def test_stopping_stops_old_and_new(self):
        old = self.old
        self.sup.recycle("model-0", "test")
        new = self.proto()
        d = self.sup.stopService()
        self.assertEqual((old.transport.signals, new.transport.signals), (["TERM"], ["TERM"]))
        new.processEnded(exited(0))
        self.reactor.advance(0.1)
        self.assertNoResult(d)  # the old one is still draining
        old.processEnded(exited(0))
        self.reactor.advance(0.1)
        self.successResultOf(d)

    def test_resident_bytes(self):
        import os

        self.assertGreater(resident_bytes(os.getpid()), 1024 * 1024)
        self.assertIsNone(resident_bytes(2 ** 22 + 12345))


class EnvironmentTestCase(SynchronousTestCase):
    def supervisor(self, scripts=("/x/a.py",), copies=1, **kwargs):
        reactor = FakeProcessReactor()
        sup = WorkerSupervisor(reactor, list(scripts), copies, "127.0.0.1:1", 0.5,
                               socket_dir="/nonexistent", **kwargs)
        sup.log = Logger(observer=lambda e: None)
        sup.startService()
        self.addCleanup(sup.stopService)
        return reactor, sup


class MathThreadTests(EnvironmentTestCase):
    def setUp(self):
        import os

        for var in MATH_THREAD_VARIABLES:
            if var in os.environ:
                self.patch(os, "environ", {k: v for k, v in os.environ.items()
                                           if k not in MATH_THREAD_VARIABLES})
                break

    def threads(self, reactor):
        return [{var: env.get(var) for var in MATH_THREAD_VARIABLES} for _, env, _ in reactor.spawned]

    def test_cores_shared_among_every_worker(self):
        reactor, _ = self.supervisor(["/x/a.py", "/x/b.py"], copies=2, cores=16)
        self.assertEqual(self.threads(reactor), [dict.fromkeys(MATH_THREAD_VARIABLES, "4")] * 4)

    def test_at_least_one(self):
        reactor, _ = self.supervisor(["/x/a.py", "/x/b.py"], copies=3, cores=4)
        self.assertEqual(self.threads(reactor), [dict.fromkeys(MATH_THREAD_VARIABLES, "1")] * 6)

    def test_the_operators_variables_are_kept(self):
        import os

        self.patch(os, "environ", dict(os.environ, OMP_NUM_THREADS="7"))
        reactor, _ = self.supervisor(copies=2, cores=8)
        for threads in self.threads(reactor):
            self.assertEqual(threads["OMP_NUM_THREADS"], "7")
            self.assertEqual(threads["MKL_NUM_THREADS"], "4")

    def test_the_option_overrides_everything(self):
        import os

        self.patch(os, "environ", dict(os.environ, OMP_NUM_THREADS="7"))
        reactor, _ = self.supervisor(copies=2, cores=8, math_threads=3)
        self.assertEqual(self.threads(reactor), [dict.fromkeys(MATH_THREAD_VARIABLES, "3")] * 2)

    def test_available_cores(self):
        import os

        cores = available_cores()
        self.assertGreaterEqual(cores, 1)
        self.assertLessEqual(cores, os.cpu_count())


class GpuTests(EnvironmentTestCase):
    def devices(self, reactor):
        return [(name, env.get("CUDA_VISIBLE_DEVICES")) for name, env, _ in reactor.spawned]

    def test_round_robin_over_every_worker(self):
        reactor, _ = self.supervisor(["/x/a.py", "/x/b.py"], copies=3, gpus=["0", "1"])
        self.assertEqual(self.devices(reactor), [("a-0", "0"), ("a-1", "1"), ("a-2", "0"),
                                                 ("b-0", "1"), ("b-1", "0"), ("b-2", "1")])

    def test_none_given_leaves_it_inherited(self):
        import os

        self.patch(os, "environ", dict(os.environ, CUDA_VISIBLE_DEVICES="5"))
        reactor, _ = self.supervisor(copies=2)
        self.assertEqual(self.devices(reactor), [("a-0", "5"), ("a-1", "5")])

    def test_a_restarted_or_recycled_worker_keeps_its_device(self):
        reactor, sup = self.supervisor(copies=2, gpus=["GPU-aaaa", "GPU-bbbb"])
        proto = sup.protocols["a-1"]
        proto.childDataReceived(supervision.STATUS_FD, b"registered\n")
        sup.recycle("a-1", "test")
        sup.protocols["a-0"].processEnded(exited(1))
        reactor.advance(1)
        self.assertEqual(self.devices(reactor)[2:], [("a-1", "GPU-bbbb"), ("a-0", "GPU-aaaa")])


class InterpreterTests(EnvironmentTestCase):
    def test_the_ingress_interpreter_by_default(self):
        import os
        import sys

        reactor, _ = self.supervisor()
        self.assertEqual(reactor.argvs, [(sys.executable, [sys.executable, os.path.abspath("/x/a.py")])])

    def test_an_interpreter_of_choice(self):
        reactor, _ = self.supervisor(python="/opt/venv/bin/python")
        self.assertEqual(reactor.argvs, [("/opt/venv/bin/python", ["/opt/venv/bin/python", "/x/a.py"])])

    def test_shebang(self):
        import os
        import sys
        import tempfile

        folder = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, folder)
        with_line, without, not_executable = (os.path.join(folder, n) for n in ("a.py", "b.py", "c.py"))
        for path, text, mode in ((with_line, "#!/opt/venv/bin/python -X utf8\n", 0o755),
                                 (without, "import os\n", 0o755),
                                 (not_executable, "#!/opt/venv/bin/python\n", 0o644)):
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, mode)
        self.assertEqual(shebang_of(with_line), "/opt/venv/bin/python -X utf8")
        self.assertIsNone(shebang_of(without))
        self.assertIsNone(shebang_of(not_executable))
        reactor, _ = self.supervisor([with_line, without, not_executable], python=SHEBANG)
        self.assertEqual(reactor.argvs, [(with_line, [with_line]),
                                         (sys.executable, [sys.executable, without]),
                                         (sys.executable, [sys.executable, not_executable])])

    def test_an_interpreter_without_the_sdk_is_named(self):
        reactor, sup = self.supervisor(python="/usr/bin/python3")
        messages = []
        sup.log = Logger(observer=lambda e: messages.append(formatEvent(e)))
        proto = sup.protocols["a-0"]
        proto.childDataReceived(2, b"Traceback (most recent call last):\n"
                                   b"ModuleNotFoundError: No module named 'anyserve_tw'\n")
        proto.processEnded(exited(1))
        self.assertIn("exited with code 1 before registering: its interpreter (/usr/bin/python3) cannot "
                      "import anyserve_tw; install AnyServe there or choose another with --worker-python",
                      messages[-1])
