"""Worker lifecycle with real processes: supervised workers die with their
ingress, never register once it is gone, every exit is logged with its code
or signal, crash loops back off, a script that never calls ``app.run()`` is
named, and a worker's shutdown leaves no traceback however many SIGTERMs it
gets."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import (
    KSERVE_SERVER, PROBE_SERVER, BackgroundInfer, Ingress, pid_alive, wait_for,
)
from anyserve_tw.wire import supervision

#: Bound on how long an orphaned worker may take to go: the grace an orphan
#: gets before it exits outright, plus room for a loaded machine.
ORPHAN_BOUND = supervision.ORPHAN_GRACE + 8

#: Bound for a worker with a request in flight: less than the 10 s its
#: shutdown would wait for that request, which an orphan must not.
STUCK_BOUND = supervision.ORPHAN_GRACE + 5

STUCK_SERVER = """\
import time
from anyserve_tw import AnyServe

app = AnyServe()


@app.model("stuck", inputs=[("x", "INT32", [1])], outputs=[("x", "INT32", [1])])
def stuck(request):
    open({mark!r}, "w").close()
    time.sleep(120)  # longer than any test: only an outright exit ends it
    return {{"x": request["x"]}}


app.run()
"""

CRASHY_SERVER = """\
raise SystemExit(3)
"""

NO_RUN_SERVER = """\
from anyserve_tw import AnyServe

app = AnyServe()


@app.model("forgotten")
def forgotten(request):
    return {{}}
"""

#: Starts a worker as a supervising ingress would, but with no lifeline: only
#: the parent-death signal ties it to this process.  Prints the worker's pid.
MIDDLE = """\
import os, subprocess, sys, time
env = dict(os.environ, ANYSERVE_SUPERVISOR_PID=str(os.getpid()))
worker = subprocess.Popen([sys.executable, sys.argv[1]], env=env, stdin=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
print(worker.pid, flush=True)
time.sleep(600)
"""


class LifecycleTestCase(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="as-life-", dir="/tmp")
        self.addCleanup(_rmtree, self.dir)

    def script(self, name, text, **values):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text.format(**values))
        return path

    def ingress(self, *workers, **kwargs):
        ingress = Ingress(workers, **kwargs)
        self.addCleanup(ingress.cleanup)
        return ingress

    def kill_later(self, pid):
        """Cleanup: SIGKILL ``pid`` if a failed test left it running."""
        def kill():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.addCleanup(kill)

    def wait_gone(self, pids, what, bound=ORPHAN_BOUND):
        for pid in pids:
            wait_for(lambda: not pid_alive(pid), bound, what="%s (pid %d) to exit" % (what, pid))

    def log_line(self, ingress, *parts, timeout=20):
        """Wait for a line of the ingress's log holding every one of ``parts``."""
        def find():
            for line in ingress.log().splitlines():
                if all(part in line for part in parts):
                    return line
        return wait_for(find, timeout, what="a log line with %r" % (parts,))


class DieWithTheIngressTests(LifecycleTestCase):
    def test_supervised_workers_die_with_a_sigkilled_ingress(self):
        """SIGKILL (or the OOM killer) gives the ingress no chance to stop its
        workers; they used to live on as orphans."""
        ingress = self.ingress(KSERVE_SERVER, copies=2)
        ingress.wait_ready("add")
        pids = ingress.worker_pids()
        self.assertEqual(len(pids), 2)
        for pid in pids:
            self.kill_later(pid)
        ingress.process.kill()
        ingress.process.wait()
        self.wait_gone(pids, "orphaned worker")

    def test_a_worker_stuck_in_a_handler_still_dies_with_its_ingress(self):
        """Its shutdown would wait 10 s for the request in flight, whose
        answer has nowhere to go: it exits outright ORPHAN_GRACE seconds
        after the ingress went."""
        mark = os.path.join(self.dir, "entered")
        ingress = self.ingress(self.script("stuck_server.py", STUCK_SERVER, mark=mark))
        ingress.wait_ready("stuck")
        [pid] = ingress.worker_pids()
        self.kill_later(pid)
        call = BackgroundInfer(ingress.address, "stuck", client_timeout=60, x=np.array([1], dtype=np.int32))
        wait_for(lambda: os.path.exists(mark), 20, what="the handler to start")
        ingress.process.kill()
        ingress.process.wait()
        self.wait_gone([pid], "worker stuck in a handler", bound=STUCK_BOUND)
        self.assertEqual(call.join()[0], "StatusCode.UNAVAILABLE")

    def test_the_parent_death_signal_alone(self):
        """A worker whose lifeline is missing (a wrapper closed it) still gets
        SIGTERM from the kernel when its parent dies, and stops cleanly: its
        models are withdrawn from the (independent) ingress it served."""
        ingress = self.ingress()
        ingress.wait_ready()
        env = dict(os.environ, ANYSERVE_INGRESS=ingress.mgmt_address, ANYSERVE_HEARTBEAT_INTERVAL="0.5",
                   ANYSERVE_SOCKET=os.path.join(self.dir, "w.sock"))
        middle = subprocess.Popen([sys.executable, "-c", MIDDLE, KSERVE_SERVER], env=env,
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.addCleanup(middle.wait)
        self.kill_later(middle.pid)
        worker_pid = int(middle.stdout.readline())
        middle.stdout.close()
        self.kill_later(worker_pid)
        ingress.wait_ready("add")
        middle.kill()
        self.wait_gone([worker_pid], "worker whose parent died")
        self.assertFalse(ingress.client().is_model_ready("add"))
        self.assertIn("withdrawn by worker", ingress.log())


class NeverRegisterWhenOrphanedTests(LifecycleTestCase):
    """A worker whose ingress died while it started must not register with
    whatever listens on the management port next."""

    def start_orphan(self, ingress, lifeline):
        dead = subprocess.Popen([sys.executable, "-c", ""])
        dead.wait()  # a supervisor that is gone
        env = dict(os.environ, ANYSERVE_INGRESS=ingress.mgmt_address, ANYSERVE_SUPERVISED="1",
                   ANYSERVE_SOCKET=os.path.join(self.dir, "orphan.sock"),
                   ANYSERVE_HEARTBEAT_INTERVAL="0.5", ANYSERVE_SUPERVISOR_PID=str(dead.pid))
        fds = ()
        if lifeline:
            r, w = os.pipe()
            os.close(w)  # the only write end: the ingress is gone
            env["ANYSERVE_LIFELINE_FD"] = str(r)
            fds = (r,)
        worker = subprocess.Popen([sys.executable, KSERVE_SERVER], env=env, pass_fds=fds,
                                  stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for fd in fds:
            os.close(fd)
        self.kill_later(worker.pid)
        try:
            _, err = worker.communicate(timeout=ORPHAN_BOUND + 10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()
            self.fail("an orphaned worker kept running")
        return worker.returncode, err.decode()

    def assert_never_registered(self, ingress):
        self.assertFalse(ingress.client().is_model_ready("add"))
        self.assertNotIn("served by worker", ingress.log())

    def test_broken_lifeline_at_start(self):
        ingress = self.ingress()
        ingress.wait_ready()
        code, err = self.start_orphan(ingress, lifeline=True)
        # SIGTERM before its reactor ran: the default action, at once.
        self.assertEqual(code, -signal.SIGTERM, err)
        self.assertIn("is gone", err)
        self.assert_never_registered(ingress)

    def test_no_lifeline_and_a_dead_supervisor(self):
        ingress = self.ingress()
        ingress.wait_ready()
        code, err = self.start_orphan(ingress, lifeline=False)
        self.assertEqual(code, 1, err)
        self.assertIn("the ingress that started this worker (pid", err)
        self.assert_never_registered(ingress)


class ExitLogTests(LifecycleTestCase):
    def test_exits_are_logged_and_crash_loops_back_off(self):
        """Each exit is logged with its code or signal; a script that exits
        at once, or exits 0 without calling app.run(), is restarted after 1 s,
        then 2 s; a killed worker after 1 s; a clean stop is logged too."""
        crashy = self.script("crashy.py", CRASHY_SERVER)
        no_run = self.script("no_run.py", NO_RUN_SERVER)
        ingress = self.ingress(crashy, no_run, KSERVE_SERVER)
        ingress.wait_ready("add")
        for delay in ("1s", "2s"):
            self.log_line(ingress, "worker crashy-0 (pid", ") exited with code 3 before registering (ran",
                          "restarting in %s)" % delay)
            self.log_line(ingress, "worker no_run-0 (pid", ") exited with code 0 before registering: "
                          "does the script call app.run()? (ran", "restarting in %s)" % delay)
        self.assertFalse(ingress.client().is_model_ready("forgotten"))

        [pid] = ingress.worker_pids(KSERVE_SERVER)
        os.kill(pid, signal.SIGKILL)
        self.log_line(ingress, "worker kserve_server-0 (pid %d) killed by SIGKILL (ran" % pid, "restarting in 1s)")
        new_pid = wait_for(lambda: [p for p in ingress.worker_pids(KSERVE_SERVER) if p != pid], 20,
                           what="kserve_server restarted")[0]
        ingress.wait_ready("add")
        self.assertEqual(ingress.stop(), -signal.SIGTERM)  # twistd exits by the signal it got
        self.assertIn("worker kserve_server-0 (pid %d) exited with code 0\n" % new_pid, ingress.log())


class CleanShutdownTests(LifecycleTestCase):
    def test_repeated_sigterm_leaves_no_traceback(self):
        """A second SIGTERM while the worker drains (a service manager's and
        the ingress's, or the parent-death signal) used to raise
        ReactorNotRunning."""
        ingress = self.ingress(PROBE_SERVER)
        ingress.wait_ready("slow")
        [pid] = ingress.worker_pids()
        call = BackgroundInfer(ingress.address, "slow", seconds=np.array([2.0]))
        self.log_line(ingress, "[probe_server-0]", "registered")
        time.sleep(0.3)  # let the request reach the worker
        os.kill(pid, signal.SIGTERM)
        self.log_line(ingress, "[probe_server-0]", "received SIGTERM, shutting down")
        os.kill(pid, signal.SIGTERM)
        self.log_line(ingress, "[probe_server-0]", "received SIGTERM again: already shutting down")
        outcome = call.join()
        self.assertEqual(outcome[0], "ok", outcome)  # drained, not cut
        self.log_line(ingress, "worker probe_server-0 (pid %d) exited with code 0 (ran" % pid)
        ingress.wait_ready("slow")  # restarted
        ingress.stop()
        log = ingress.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("ReactorNotRunning", log)
        self.assertIn("exited with code 0\n", log)


def _rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)
