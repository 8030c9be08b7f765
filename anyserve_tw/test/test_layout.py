"""The package is split along the process boundary: the ingress never loads
the worker SDK or numpy, and the worker never loads the ingress."""
import json
import pkgutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import anyserve_tw.ingress
import anyserve_tw.worker


def _modules(package):
    return [package.__name__] + [
        "%s.%s" % (package.__name__, info.name)
        for info in pkgutil.iter_modules(package.__path__)
    ]


def _loaded_after_importing(modules):
    """The anyserve_tw modules (and numpy, if any) a fresh interpreter holds
    after importing ``modules``."""
    script = (
        "import importlib, json, sys\n"
        "for name in %r: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.startswith('anyserve_tw') or m == 'numpy')))\n" % (modules,)
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


class ProcessBoundaryTests(SynchronousTestCase):
    def test_ingress_loads_no_worker_code_and_no_numpy(self):
        modules = _modules(anyserve_tw.ingress)
        self.assertIn("anyserve_tw.ingress.tap", modules)
        loaded = _loaded_after_importing(modules)
        self.assertIn("anyserve_tw.ingress.router", loaded)
        self.assertNotIn("numpy", loaded)
        self.assertEqual([m for m in loaded if m.startswith("anyserve_tw.worker")], [])

    def test_worker_loads_no_ingress_code(self):
        modules = _modules(anyserve_tw.worker)
        self.assertIn("anyserve_tw.worker.app", modules)
        loaded = _loaded_after_importing(modules)
        self.assertIn("numpy", loaded)  # the worker does decode tensors
        self.assertEqual([m for m in loaded if m.startswith("anyserve_tw.ingress")], [])

    def test_worker_datatypes_are_the_shared_names(self):
        from anyserve_tw.wire.defaults import DATATYPE_NAMES
        from anyserve_tw.worker.tensors import DATATYPES

        self.assertEqual(set(DATATYPES), set(DATATYPE_NAMES))
