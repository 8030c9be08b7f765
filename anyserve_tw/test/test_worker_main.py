"""Tests for anyserve_tw.worker.main's service tree and for the worker
package's import graph."""
import ast
import os
import pkgutil

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

import anyserve_tw.worker
from anyserve_tw.worker.app import AnyServe
from anyserve_tw.worker.main import make_worker_service


class ServiceTreeTests(SynchronousTestCase):
    def test_shutdown_withdraws_then_drains_then_stops_heartbeats(self):
        top = make_worker_service(MemoryReactorClock(), AnyServe(), "127.0.0.1:9000",
                                  "/tmp/w.sock", "w-1", threads=3, max_payload=1234)
        self.assertEqual([s.name for s in top.stopping_order()],
                         ["withdrawal", "models", "registration"])
        server, registrations = top.getServiceNamed("models"), top.getServiceNamed("registration")
        [registration] = registrations.registrations
        self.assertEqual(registration.worker_address, "unix:///tmp/w.sock")
        self.assertEqual(registration.ingress, "127.0.0.1:9000")
        self.assertEqual((server.execution.pool.max, server.execution.max_payload), (3, 1234))


    def test_one_registration_per_ingress(self):
        """ANYSERVE_INGRESS=a,b: a registration for each, each with its own
        schedule; the worker counts as registered once any has taken it."""
        top = make_worker_service(MemoryReactorClock(), AnyServe(), "10.0.0.1:9000, 10.0.0.2:9000,10.0.0.1:9000",
                                  "/tmp/w.sock", "w-1")
        registrations = top.getServiceNamed("registration")
        self.assertEqual([r.ingress for r in registrations.registrations], ["10.0.0.1:9000", "10.0.0.2:9000"])
        self.assertFalse(registrations.registered)
        registrations.registrations[1].registered = True
        self.assertTrue(registrations.registered)

    def test_network_listener_registers_its_advertised_address(self):
        top = make_worker_service(MemoryReactorClock(), AnyServe(), "10.0.0.1:9000", "/tmp/w.sock", "w-1",
                                  listen="tcp://0.0.0.0:7001", advertise="tcp://10.0.0.5:7001")
        [registration] = top.getServiceNamed("registration").registrations
        self.assertEqual(registration.worker_address, "tcp://10.0.0.5:7001")

    def test_network_listener_on_every_interface_needs_an_advertised_address(self):
        e = self.assertRaises(ValueError, make_worker_service, MemoryReactorClock(), AnyServe(),
                              "10.0.0.1:9000", "/tmp/w.sock", "w-1", listen="tcp://0.0.0.0:7001")
        self.assertIn("ANYSERVE_ADVERTISE", str(e))

    def test_tls_listener_needs_certificates(self):
        e = self.assertRaises(ValueError, make_worker_service, MemoryReactorClock(), AnyServe(),
                              "10.0.0.1:9000", "/tmp/w.sock", "w-1", listen="tls://10.0.0.5:7001")
        self.assertIn("ANYSERVE_TLS_CA", str(e))


def module_level_imports(path):
    """anyserve_tw.worker modules a module imports when it is loaded (not
    those imported inside functions)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + ["%s.%s" % (node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("anyserve_tw.worker."))
    return found


class ImportGraphTests(SynchronousTestCase):
    def test_no_cycles(self):
        """app -> model, never back: the authoring API loads without the
        process machinery, and no module needs another half-loaded."""
        package = anyserve_tw.worker
        folder = os.path.dirname(package.__file__)
        modules = {"anyserve_tw.worker." + info.name for info in pkgutil.iter_modules(package.__path__)}
        graph = {m: module_level_imports(os.path.join(folder, m.rsplit(".", 1)[1] + ".py")) & modules
                 for m in modules}
        self.assertNotIn("anyserve_tw.worker.main", graph["anyserve_tw.worker.app"])
        visiting, done = set(), set()

        def visit(module, path):
            if module in done:
                return
            self.assertNotIn(module, visiting, "import cycle: %s" % " -> ".join(path + [module]))
            visiting.add(module)
            for imported in graph[module]:
                visit(imported, path + [module])
            visiting.discard(module)
            done.add(module)

        for module in sorted(graph):
            visit(module, [])
