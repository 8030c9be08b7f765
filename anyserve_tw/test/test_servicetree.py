"""Tests for anyserve_tw.servicetree.SequentialMultiService and
anyserve_tw.ingress.supervisor.WorkerSupervisor (the latter with real processes)."""
import json
import os
import shutil
import signal
import tempfile
import time

from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anyserve_tw.servicetree import SequentialMultiService
from anyserve_tw.ingress.supervisor import WorkerSupervisor


class Child(Service):
    """A service whose stop is finished by the test."""

    def __init__(self, name, log, mode="deferred"):
        self.setName(name)
        self.log = log
        self.mode = mode
        self.stopping = None

    def stopService(self):
        Service.stopService(self)
        self.log.append(self.name)
        if self.mode == "raise":
            raise RuntimeError("%s cannot stop" % self.name)
        if self.mode == "fail":
            return fail(RuntimeError("%s failed to stop" % self.name))
        if self.mode == "sync":
            return None
        self.stopping = Deferred()
        return self.stopping


class SequentialMultiServiceTests(SynchronousTestCase):
    def tree(self, *children):
        log = []
        parent = SequentialMultiService()
        for name, mode in children:
            Child(name, log, mode).setServiceParent(parent)
        parent.startService()
        self.assertTrue(all(child.running for child in parent))
        return parent, log

    def test_stops_in_reverse_one_at_a_time(self):
        parent, log = self.tree(("a", "deferred"), ("b", "deferred"), ("c", "deferred"))
        a, b, c = (parent.getServiceNamed(n) for n in "abc")
        d = parent.stopService()
        self.assertFalse(parent.running)
        self.assertEqual(log, ["c"])  # b waits for c
        self.assertNoResult(d)
        c.stopping.callback(None)
        self.assertEqual(log, ["c", "b"])
        self.assertTrue(a.running)
        b.stopping.callback(None)
        self.assertEqual(log, ["c", "b", "a"])
        self.assertNoResult(d)  # not done until the last one is
        a.stopping.callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(any(child.running for child in parent))

    def test_synchronous_children(self):
        parent, log = self.tree(("a", "sync"), ("b", "deferred"), ("c", "sync"))
        d = parent.stopService()
        self.assertEqual(log, ["c", "b"])
        self.assertNoResult(d)
        parent.getServiceNamed("b").stopping.callback(None)
        self.assertEqual(log, ["c", "b", "a"])
        self.successResultOf(d)

    def test_failing_child_does_not_stop_the_rest(self):
        parent, log = self.tree(("a", "deferred"), ("b", "raise"), ("c", "fail"), ("d", "deferred"))
        d = parent.stopService()
        self.assertEqual(log, ["d"])
        parent.getServiceNamed("d").stopping.errback(RuntimeError("d broke late"))
        self.assertEqual(log, ["d", "c", "b", "a"])
        self.assertNoResult(d)
        parent.getServiceNamed("a").stopping.callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(any(child.running for child in parent))
        # Each failure is logged, none is lost.
        self.assertEqual(
            sorted(str(f.value) for f in self.flushLoggedErrors(RuntimeError)),
            ["b cannot stop", "c failed to stop", "d broke late"],
        )

    def test_no_children(self):
        parent = SequentialMultiService()
        parent.startService()
        self.assertIsNone(self.successResultOf(parent.stopService()))
        self.assertFalse(parent.running)


WORKER_SCRIPT = """\
import json, os, signal, sys, time
if {ignore_term!r}:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
record = dict(
    pid=os.getpid(),
    env={{k: os.environ.get(k) for k in (
        "ANYSERVE_INGRESS", "ANYSERVE_SOCKET", "ANYSERVE_SUPERVISED",
        "ANYSERVE_HEARTBEAT_INTERVAL", "ANYSERVE_WORKER_ID", "ANYSERVE_TEST_INHERITED",
    )}},
)
out = os.path.join({out!r}, "%d.json" % os.getpid())
with open(out + ".tmp", "w") as f:
    json.dump(record, f)
os.rename(out + ".tmp", out)
while True:
    time.sleep(1)
"""


def pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class WorkerSupervisorTests(TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(dir="/tmp", prefix="asup")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.out = os.path.join(self.dir, "out")
        os.mkdir(self.out)
        self.started = []
        os.environ["ANYSERVE_WORKER_ID"] = "must-not-leak"
        os.environ["ANYSERVE_TEST_INHERITED"] = "yes"
        self.addCleanup(os.environ.pop, "ANYSERVE_WORKER_ID", None)
        self.addCleanup(os.environ.pop, "ANYSERVE_TEST_INHERITED", None)

    def script(self, name="worker.py", ignore_term=False):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(WORKER_SCRIPT.format(out=self.out, ignore_term=ignore_term))
        return path

    def supervisor(self, scripts, copies, socket_dir=None, kill_time=5):
        sup = WorkerSupervisor(reactor, scripts, copies, "127.0.0.1:9999", 0.5, socket_dir=socket_dir)
        sup.minRestartDelay = 0.05
        sup.killTime = kill_time
        self.addCleanup(self.stop_and_reap, sup)
        return sup

    @inlineCallbacks
    def stop_and_reap(self, sup):
        """Cleanup: never leave a child behind, even when a test failed."""
        if sup.running:
            yield sup.stopService()
        for pid in self.records():
            if pid_exists(pid):
                os.kill(pid, signal.SIGKILL)

    def records(self):
        """pid -> what each worker process reported about itself."""
        out = {}
        for name in os.listdir(self.out):
            if name.endswith(".json"):
                with open(os.path.join(self.out, name)) as f:
                    record = json.load(f)
                out[record["pid"]] = record
        return out

    @inlineCallbacks
    def poll(self, predicate, what, timeout=15.0):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail("timed out waiting for " + what)
            yield deferLater(reactor, 0.02, lambda: None)

    def live_pids(self, sup):
        return {name: proto.transport.pid for name, proto in sup.protocols.items()}

    @inlineCallbacks
    def test_spawn_restart_and_stop(self):
        sup = self.supervisor([self.script("echo_model.py")], copies=2)
        sup.startService()
        self.assertTrue(sup.running)
        self.assertTrue(os.path.isdir(sup.socket_dir))
        records = yield self.poll(lambda: len(self.records()) == 2 and self.records(), "two workers")

        pids = self.live_pids(sup)
        self.assertEqual(sorted(pids), ["echo_model-0", "echo_model-1"])
        self.assertEqual(set(records), set(pids.values()))
        sockets = set()
        for name, pid in pids.items():
            env = records[pid]["env"]
            self.assertEqual(env["ANYSERVE_INGRESS"], "127.0.0.1:9999")
            self.assertEqual(env["ANYSERVE_SOCKET"], os.path.join(sup.socket_dir, name + ".sock"))
            self.assertEqual(env["ANYSERVE_SUPERVISED"], "1")
            self.assertEqual(env["ANYSERVE_HEARTBEAT_INTERVAL"], "0.5")
            self.assertIsNone(env["ANYSERVE_WORKER_ID"])  # each worker picks its own
            self.assertEqual(env["ANYSERVE_TEST_INHERITED"], "yes")  # the rest is inherited
            sockets.add(env["ANYSERVE_SOCKET"])
        self.assertEqual(len(sockets), 2)

        # A worker killed outright comes back as a new process.
        victim = pids["echo_model-0"]
        os.kill(victim, signal.SIGKILL)
        new_pid = yield self.poll(
            lambda: self.live_pids(sup).get("echo_model-0") not in (None, victim)
            and self.live_pids(sup)["echo_model-0"],
            "echo_model-0 to be restarted",
        )
        yield self.poll(lambda: new_pid in self.records(), "the restarted worker to start")
        self.assertFalse(pid_exists(victim))
        self.assertEqual(self.records()[new_pid]["env"]["ANYSERVE_SOCKET"],
                         os.path.join(sup.socket_dir, "echo_model-0.sock"))
        self.assertEqual(self.live_pids(sup)["echo_model-1"], pids["echo_model-1"])  # untouched

        socket_dir = sup.socket_dir
        open(os.path.join(socket_dir, "echo_model-0.sock"), "w").close()  # a leftover socket
        final = list(self.live_pids(sup).values())
        d = sup.stopService()
        self.assertNoResult(d)  # SIGTERM was sent, nobody has exited yet
        yield d
        for pid in final:
            self.assertFalse(pid_exists(pid), "worker %d still running after stopService" % pid)
        self.assertEqual(sup.protocols, {})
        self.assertFalse(os.path.exists(socket_dir))
        # And nothing is restarted afterwards.
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(sup.protocols, {})
        self.assertEqual(len(self.records()), 3)

    @inlineCallbacks
    def test_stop_waits_for_workers_that_ignore_sigterm(self):
        sup = self.supervisor([self.script("stubborn.py", ignore_term=True)], copies=1, kill_time=0.3)
        sup.startService()
        yield self.poll(lambda: len(self.records()) == 1, "the worker to start")
        [pid] = self.live_pids(sup).values()
        started = time.monotonic()
        yield sup.stopService()
        self.assertGreaterEqual(time.monotonic() - started, 0.25)  # waited for the SIGKILL
        self.assertFalse(pid_exists(pid))
        self.assertEqual(sup.protocols, {})

    @inlineCallbacks
    def test_given_socket_dir_is_kept_but_sockets_removed(self):
        socket_dir = os.path.join(self.dir, "sockets")
        os.mkdir(socket_dir)
        sup = self.supervisor([self.script("m.py")], copies=2, socket_dir=socket_dir)
        sup.startService()
        self.assertEqual(sup.socket_dir, socket_dir)
        records = yield self.poll(lambda: len(self.records()) == 2 and self.records(), "two workers")
        self.assertEqual(
            sorted(r["env"]["ANYSERVE_SOCKET"] for r in records.values()),
            [os.path.join(socket_dir, "m-0.sock"), os.path.join(socket_dir, "m-1.sock")],
        )
        for name in ("m-0.sock", "m-1.sock", "unrelated.txt"):
            open(os.path.join(socket_dir, name), "w").close()
        yield sup.stopService()
        self.assertEqual(os.listdir(socket_dir), ["unrelated.txt"])


class StopOrderTests(SynchronousTestCase):
    def test_named_children_stop_first_in_the_given_order(self):
        """The ingress starts workers last but must stop them second."""
        from anyserve_tw.servicetree import SequentialMultiService

        stopped = []

        class Recorder(Service):
            def stopService(self):
                super().stopService()
                stopped.append(self.name)

        top = SequentialMultiService(stop_order=["c", "a"])
        for name in "abcd":
            child = Recorder()
            child.setName(name)
            child.setServiceParent(top)
        top.startService()
        top.stopService()
        self.assertEqual(stopped, ["c", "a", "d", "b"])


class SlotNameTests(SynchronousTestCase):
    def test_scripts_sharing_a_file_name_get_distinct_slots(self):
        from twisted.internet.task import Clock

        from anyserve_tw.ingress.supervisor import WorkerSupervisor

        class FakeReactor(Clock):
            def spawnProcess(self, *args, **kwargs):
                raise AssertionError("not started in this test")

        sup = WorkerSupervisor(FakeReactor(), ["a/server.py", "b/server.py", "c/other.py"],
                               copies=2, ingress_address="127.0.0.1:1", heartbeat_interval=1)
        slots = list(sup.slots())
        self.assertEqual([name for name, _ in slots],
                         ["server-0", "server-1", "server.1-0", "server.1-1", "other-0", "other-1"])
        self.assertEqual([script for _, script in slots][2:4], ["b/server.py"] * 2)
