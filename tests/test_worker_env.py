"""What the supervisor gives each worker process, seen by the worker itself
(tests/workers/env_server.py): math-library threads sized to the cores
(``--worker-math-threads``), a GPU each (``--gpus``), and the interpreter
(``--worker-python``: a path, or ``shebang``), with a clear log line when
that interpreter cannot import anyserve_tw."""
import json
import os
import stat
import sys
import tempfile

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import ROOT, Ingress, wait_for
from anyserve_tw.ingress.supervisor import MATH_THREAD_VARIABLES, available_cores
from anyserve_tw.ingress.tap import Options

ENV_SERVER = os.path.join(ROOT, "tests", "workers", "env_server.py")

#: A --worker-python that records its arguments, marks the environment and
#: runs the real interpreter with ``{flags}``.
WRAPPER = """#!/bin/sh
echo "$@" >> {mark}
WRAPPED_BY=wrapper
export WRAPPED_BY
exec {python} {flags} "$@"
"""


def clean_environment(**extra):
    """Our environment without the variables under test, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in MATH_THREAD_VARIABLES and k not in ("CUDA_VISIBLE_DEVICES", "WRAPPED_BY")}
    env.update(extra)
    return env


class WorkerEnvironmentTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="as-env-", dir="/tmp")
        self.addCleanup(__import__("shutil").rmtree, self.dir, True)

    def ingress(self, copies=1, args=(), env=None, workers=(ENV_SERVER,)):
        ingress = Ingress(workers, copies=copies, args=args, env=env)
        self.addCleanup(ingress.cleanup)
        return ingress

    def executable(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
        return path

    def infos(self, ingress, workers):
        """The ``env`` answer of each of ``workers`` processes, by pid."""
        ingress.wait_ready("env", timeout=90)  # a loaded CI machine starts slowly
        client = ingress.client()
        seen = {}

        def every_worker():
            info = json.loads(client.infer("env", []).as_numpy("info")[0])
            seen[info["pid"]] = info
            return len(seen) >= workers
        wait_for(every_worker, 60, interval=0, what="an answer from each of %d workers" % workers)
        return seen

    def test_math_threads_and_gpus(self):
        """Two workers share the cores; the operator's OMP_NUM_THREADS is
        kept; each worker gets its own GPU."""
        ingress = self.ingress(copies=2, args=["--gpus", "3,5"], env=clean_environment(OMP_NUM_THREADS="7"))
        infos = self.infos(ingress, 2)
        self.assertEqual(sorted(infos), sorted(ingress.worker_pids()))
        share = str(max(1, available_cores() // 2))
        for info in infos.values():
            env = info["env"]
            self.assertEqual(env["OMP_NUM_THREADS"], "7")
            for var in ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                        "VECLIB_MAXIMUM_THREADS"):
                self.assertEqual(env[var], share, var)
            self.assertEqual(info["argv"][0], sys.executable)  # the default interpreter
            # The worker registered with the token its supervisor gave it,
            # but its handlers (and their subprocesses) don't see it.
            self.assertIsNone(env["ANYSERVE_TOKEN"])
        self.assertEqual(sorted(info["env"]["CUDA_VISIBLE_DEVICES"] for info in infos.values()), ["3", "5"])

    def test_explicit_math_threads_and_an_interpreter_of_choice(self):
        """--worker-math-threads wins over the operator's variables; without
        --gpus CUDA_VISIBLE_DEVICES is left as inherited; --worker-python
        runs the worker (a wrapper script standing for another venv)."""
        mark = os.path.join(self.dir, "ran")
        wrapper = self.executable("python-wrapper", WRAPPER.format(mark=mark, python=sys.executable, flags=""))
        ingress = self.ingress(args=["--worker-math-threads", "3", "--worker-python", wrapper],
                               env=clean_environment(OMP_NUM_THREADS="7", CUDA_VISIBLE_DEVICES="9"))
        [info] = self.infos(ingress, 1).values()
        env = info["env"]
        self.assertEqual({var: env[var] for var in MATH_THREAD_VARIABLES},
                         dict.fromkeys(MATH_THREAD_VARIABLES, "3"))
        self.assertEqual(env["CUDA_VISIBLE_DEVICES"], "9")
        self.assertEqual(env["WRAPPED_BY"], "wrapper")
        self.assertEqual(info["argv"], [sys.executable, ENV_SERVER])
        with open(mark) as f:
            self.assertEqual(f.read().split(), [ENV_SERVER])

    def test_shebang(self):
        """``--worker-python shebang`` runs an executable script by its own
        ``#!`` line (here: our interpreter with -u)."""
        with open(ENV_SERVER) as f:
            text = f.read()
        script = self.executable("shebang_server.py", "#!%s -u\n%s" % (sys.executable, text))
        ingress = self.ingress(args=["--worker-python", "shebang"], workers=[script])
        [info] = self.infos(ingress, 1).values()
        self.assertEqual(info["argv"], [sys.executable, "-u", script])

    def test_an_interpreter_without_the_sdk_is_named(self):
        """A worker whose interpreter cannot import anyserve_tw (here: ours
        without site-packages or PYTHONPATH) gets a log line that says so."""
        wrapper = self.executable("bare-python", WRAPPER.format(
            mark=os.path.join(self.dir, "ran"), python=sys.executable, flags="-E -S"))
        ingress = self.ingress(args=["--worker-python", wrapper])

        def named():
            return [line for line in ingress.log().splitlines() if "cannot import anyserve_tw" in line]
        [line, *_] = wait_for(named, 90, what="the log line naming the interpreter")
        self.assertIn("worker env_server-0", line)
        self.assertIn("exited with code 1 before registering: its interpreter (%s) cannot import "
                      "anyserve_tw; install AnyServe there or choose another with --worker-python"
                      % wrapper, line)


class OptionTests(SynchronousTestCase):
    def parse(self, *args):
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_defaults(self):
        options = self.parse()
        self.assertEqual((options["worker-max-requests"], options["worker-max-rss"],
                          options["worker-math-threads"], options["worker-python"], options["gpus"]),
                         (0, 0, 0, None, None))

    def test_values(self):
        options = self.parse("--worker-max-requests", "1000", "--worker-max-rss", "512",
                             "--worker-math-threads", "2", "--worker-python", "sh", "--gpus", "0, 1")
        self.assertEqual((options["worker-max-requests"], options["worker-max-rss"],
                          options["worker-math-threads"], options["gpus"]), (1000, 512, 2, ["0", "1"]))
        self.assertTrue(os.path.isabs(options["worker-python"]))  # found on PATH
        self.assertEqual(self.parse("--worker-python", "shebang")["worker-python"], "shebang")

    def test_refused(self):
        for args in (["--worker-max-requests", "-1"], ["--worker-max-rss", "-1"],
                     ["--worker-math-threads", "-1"], ["--gpus", "0,,1"], ["--gpus", ""],
                     ["--worker-python", "/nonexistent/python"]):
            self.assertRaises(usage.UsageError, self.parse, *args)
