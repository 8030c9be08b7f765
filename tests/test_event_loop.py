"""The ingress on uvloop (``--loop uvloop``): the reactor still hears
its children exit, so SIGTERM stops the ingress and its workers.

uvloop's ``run_forever`` takes over ``signal.set_wakeup_fd`` from the
reactor, which then missed a worker that exited a moment after its pipes
closed; ``twistd`` waited for that worker for ever (see
:func:`anyserve_tw.ingress.tap.keep_child_wakeups`)."""
import signal
import subprocess
import sys

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import KSERVE_SERVER, Ingress, infer_inputs, pid_alive

try:
    import uvloop  # noqa: F401
except ImportError:
    NO_UVLOOP = "uvloop is not installed"
else:
    NO_UVLOOP = None

#: Installs the ingress's reactor, starts a child that closes its pipes and
#: exits 0.3 s later (so only SIGCHLD tells the reactor), and prints the
#: loop's class and whether the reactor saw the child end.
LATE_EXIT = """\
import sys

from anyserve_tw.ingress.tap import install_reactor

reactor = install_reactor(sys.argv[1])
from twisted.internet.protocol import ProcessProtocol

print(type(reactor._asyncioEventloop).__module__)


class Child(ProcessProtocol):
    def processEnded(self, reason):
        print("ended")
        reactor.stop()


reactor.callWhenRunning(reactor.spawnProcess, Child(), "/bin/sh",
                        ["sh", "-c", "exec >&- 2>&- <&-; sleep 0.3"], env={})
reactor.callLater(5, lambda: print("not ended") or reactor.stop())
reactor.run()
"""


class UvloopTests(SynchronousTestCase):
    skip = NO_UVLOOP

    def late_exit(self, loop):
        out = subprocess.run([sys.executable, "-c", LATE_EXIT, loop], capture_output=True, text=True,
                             timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        return out.stdout.split()

    def test_a_child_exiting_after_its_pipes_closed_is_reaped(self):
        self.assertEqual(self.late_exit("uvloop"), ["uvloop", "ended"])

    def test_asyncio_loop_when_asked(self):
        self.assertEqual(self.late_exit("asyncio"), ["asyncio.unix_events", "ended"])

    def test_sigterm_stops_the_ingress_and_its_worker(self):
        """A few times over, since an ingress that misses the worker's exit
        does so only when it reads the worker's pipes closed first."""
        for _ in range(3):
            ingress = Ingress([KSERVE_SERVER], args=["--loop", "uvloop"])
            self.addCleanup(ingress.cleanup)
            ingress.wait_ready("add")
            a = np.arange(3, dtype=np.int32)
            result = ingress.client().infer("add", infer_inputs(a=a, b=a))
            self.assertEqual(result.as_numpy("sum").tolist(), [0, 2, 4])
            workers = ingress.worker_pids()
            self.assertEqual(len(workers), 1)
            self.assertEqual(ingress.stop(timeout=30), -signal.SIGTERM)
            self.assertFalse(pid_alive(workers[0]))
            self.assertIn("exited with code 0", ingress.log())
