"""``pip install .`` and ``pip install -e .`` into fresh virtual environments:
the twistd plugin is found and the one-command service answers.

The new environments get no packages from an index (CI machines may be
offline and it would take minutes): a .pth file lets them see this
environment's site-packages, whose .pth files they do not process, so the
AnyServe they import is only the one pip just installed in them.
"""
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from twisted.trial.unittest import SynchronousTestCase

from tests.harness import TWISTD_MAIN, Ingress, infer_inputs

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "_trial_temp*", "__pycache__", "*.desc")


class InstallTests(SynchronousTestCase):
    def setUp(self):
        # trial -j puts this checkout on PYTHONPATH; the new venvs must not see it.
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    def run_in(self, argv, **kwargs):
        return subprocess.run(argv, check=True, env=self.env, **kwargs)

    def install(self, *pip_args):
        """A fresh venv with a copy of this tree pip-installed into it;
        returns (its python, the copied tree)."""
        tmp = tempfile.mkdtemp(prefix="as-install-", dir="/tmp")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        source = os.path.join(tmp, "src")
        shutil.copytree(SOURCE, source, ignore=NOT_SOURCE)
        venv = os.path.join(tmp, "venv")
        self.run_in([sys.executable, "-m", "venv", "--without-pip", venv])
        python = os.path.join(venv, "bin", "python")
        site = self.run_in([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True).stdout.strip()
        with open(os.path.join(site, "outer-site-packages.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        self.run_in([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                     "--no-index", *pip_args, source], cwd=tmp)
        return python, source

    def check_installed(self, python, source, expected_root):
        where = self.run_in([python, "-c", "import anyserve_tw; print(anyserve_tw.__file__)"],
                            capture_output=True, text=True, cwd="/").stdout
        self.assertTrue(where.startswith(expected_root), where)
        listing = self.run_in([python, "-c", TWISTD_MAIN, "--help"],
                              capture_output=True, text=True, cwd="/").stdout
        self.assertIn("anyserve", listing)
        ingress = Ingress([os.path.join(source, "examples", "kserve_server.py")],
                          python=python, env=self.env)
        self.addCleanup(ingress.cleanup)
        ingress.wait_ready("add")
        a, b = np.arange(4, dtype=np.int32), np.full(4, 10, dtype=np.int32)
        result = ingress.client().infer("add", infer_inputs(a=a, b=b))
        self.assertEqual(result.as_numpy("sum").tolist(), [10, 11, 12, 13])
        workers = ingress.worker_pids()
        self.assertEqual(len(workers), 1)
        self.assertIn(python, open("/proc/%d/cmdline" % workers[0]).read().split("\0")[0])
        # twistd re-raises the SIGTERM it handled (see test_end_to_end).
        self.assertEqual(ingress.stop(), -signal.SIGTERM)

    def test_pip_install(self):
        python, source = self.install()
        self.check_installed(python, source, os.path.dirname(os.path.dirname(python)))

    def test_pip_install_editable(self):
        python, source = self.install("-e")
        self.check_installed(python, source, source)
