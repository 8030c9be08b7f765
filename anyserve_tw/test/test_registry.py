"""Tests for anyserve_tw.ingress.registry: which workers serve which (model, version)."""
import grpc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.wire.errors import InferenceError
from anyserve_tw.ingress.registry import ModelRegistry
from anyserve_tw.wire.defaults import natural_key


class FakeWorker:
    """Just what the registry looks at."""

    def __init__(self, worker_id, outstanding=0):
        self.worker_id = worker_id
        self.outstanding = outstanding

    def __repr__(self):
        return "<FakeWorker %s/%d>" % (self.worker_id, self.outstanding)


class RegisterResolveTests(SynchronousTestCase):
    """register() and resolve()."""

    def setUp(self):
        self.registry = ModelRegistry()

    def test_register_and_resolve(self):
        """A registered (name, version) resolves to its ModelVersion."""
        worker = FakeWorker("w1")
        model = self.registry.register(worker, "resnet", "1", platform="python",
                                       inputs=[("x", "FP32", (-1,))], outputs=[("y", "FP32", (-1,))])
        resolved = self.registry.resolve("resnet", "1")
        self.assertIs(resolved, model)
        self.assertEqual((resolved.name, resolved.version), ("resnet", "1"))
        self.assertEqual(resolved.platform, "python")
        self.assertEqual(resolved.inputs, (("x", "FP32", (-1,)),))
        self.assertEqual(resolved.outputs, (("y", "FP32", (-1,)),))
        self.assertEqual(resolved.workers, [worker])
        self.assertTrue(resolved.ready)
        self.assertTrue(self.registry.is_ready("resnet", "1"))

    def test_same_worker_twice(self):
        """Registering one worker twice for the same model lists it once."""
        worker = FakeWorker("w1")
        self.registry.register(worker, "m")
        self.registry.register(FakeWorker("w1"), "m")
        self.assertEqual(len(self.registry.resolve("m").workers), 1)

    def test_several_workers(self):
        """Several workers for one model are all listed."""
        a, b = FakeWorker("a"), FakeWorker("b")
        self.registry.register(a, "m", "1")
        self.registry.register(b, "m", "1")
        self.assertEqual(self.registry.resolve("m", "1").workers, [a, b])

    def test_unknown_model(self):
        """An unknown model is NOT_FOUND, worded as Triton does."""
        error = self.assertRaises(InferenceError, self.registry.resolve, "nope")
        self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(error.message, "Request for unknown model: 'nope' is not found")

    def test_unknown_model_with_version(self):
        """An unknown model asked with a version is still NOT_FOUND."""
        error = self.assertRaises(InferenceError, self.registry.resolve, "nope", "3")
        self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)
        self.assertIn("'nope'", error.message)

    def test_unknown_version(self):
        """A known model at an unknown version: NOT_FOUND naming the version."""
        self.registry.register(FakeWorker("w"), "m", "1")
        error = self.assertRaises(InferenceError, self.registry.resolve, "m", "2")
        self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(error.message, "Request for unknown model: 'm' version '2' is not found")
        self.assertFalse(self.registry.is_ready("m", "2"))
        self.assertFalse(self.registry.is_ready("other"))

    def test_versions_natural_order(self):
        """versions() lists every version in natural order."""
        for version in ("v10", "v2", "v1", ""):
            self.registry.register(FakeWorker(version), "m", version)
        self.assertEqual(self.registry.versions("m"), ["", "v1", "v2", "v10"])
        self.assertEqual(self.registry.versions("unknown"), [])

    def test_models(self):
        """models() lists every known ModelVersion."""
        self.registry.register(FakeWorker("a"), "m", "1")
        self.registry.register(FakeWorker("a"), "m", "2")
        self.registry.register(FakeWorker("a"), "n")
        self.assertEqual(
            sorted((m.name, m.version) for m in self.registry.models()),
            [("m", "1"), ("m", "2"), ("n", "")],
        )

    def test_metadata_latest_wins(self):
        """A later registration replaces platform and tensor specs."""
        self.registry.register(FakeWorker("a"), "m", "1", platform="old",
                               inputs=[("x", "FP32", (1,))], outputs=[("y", "FP32", (1,))])
        self.registry.register(FakeWorker("b"), "m", "1", platform="new",
                               inputs=[("x2", "INT64", (-1, 3))], outputs=[])
        model = self.registry.resolve("m", "1")
        self.assertEqual(model.platform, "new")
        self.assertEqual(model.inputs, (("x2", "INT64", (-1, 3)),))
        self.assertEqual(model.outputs, ())
        self.assertEqual([w.worker_id for w in model.workers], ["a", "b"])

    def test_metadata_stored_as_tuples(self):
        """Specs given as lists or generators are stored as tuples."""
        self.registry.register(FakeWorker("a"), "m", inputs=(s for s in [("x", "BOOL", (1,))]))
        self.assertEqual(self.registry.resolve("m").inputs, (("x", "BOOL", (1,)),))


class DefaultVersionTests(SynchronousTestCase):
    """The version a request without one goes to."""

    def setUp(self):
        self.registry = ModelRegistry()

    def register(self, *versions):
        for version in versions:
            self.registry.register(FakeWorker("w-" + version), "m", version)

    def test_unversioned_wins(self):
        """A version registered as '' is the default, even next to higher ones."""
        self.register("5", "", "v9")
        self.assertEqual(self.registry.default_version("m"), "")
        self.assertEqual(self.registry.resolve("m").version, "")

    def test_highest_numeric(self):
        """Numbers compare as numbers: '10' beats '2' and '9'."""
        self.register("2", "10", "9")
        self.assertEqual(self.registry.default_version("m"), "10")
        self.assertEqual(self.registry.resolve("m").version, "10")
        self.assertEqual(self.registry.resolve("m", "").version, "10")

    def test_highest_prefixed(self):
        """Digit runs inside names compare as numbers: v10 beats v2."""
        self.register("v2", "v10", "v1")
        self.assertEqual(self.registry.default_version("m"), "v10")

    def test_multi_part(self):
        """1.10 beats 1.9; 2.0 beats both."""
        self.register("1.9", "1.10")
        self.assertEqual(self.registry.default_version("m"), "1.10")
        self.register("2.0")
        self.assertEqual(self.registry.default_version("m"), "2.0")

    def test_unknown(self):
        """default_version of an unknown model is NOT_FOUND."""
        error = self.assertRaises(InferenceError, self.registry.default_version, "m")
        self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)

    def test_explicit_version_not_default(self):
        """Naming a version still gets exactly that version."""
        self.register("2", "10")
        self.assertEqual(self.registry.resolve("m", "2").version, "2")

    def test_natural_key(self):
        """natural_key orders mixed versions as people expect."""
        versions = ["v10", "v2", "10", "2", "v1", "1", "a", "v2b", "v2a"]
        self.assertEqual(
            sorted(versions, key=natural_key),
            ["1", "2", "10", "a", "v1", "v2", "v2a", "v2b", "v10"],
        )


class WorkerLossTests(SynchronousTestCase):
    """Models whose workers are lost stay known but not ready (for ever
    without a clock; see ForgettingTests for the timed forgetting)."""

    def setUp(self):
        self.registry = ModelRegistry()

    def test_last_worker_removed(self):
        """Known, not ready, and pick_worker says UNAVAILABLE."""
        self.registry.register(FakeWorker("w"), "m", "1")
        self.assertEqual(self.registry.remove_worker("w"), [("m", "1")])
        model = self.registry.resolve("m", "1")
        self.assertFalse(model.ready)
        self.assertFalse(self.registry.is_ready("m", "1"))
        error = self.assertRaises(InferenceError, self.registry.pick_worker, model)
        self.assertEqual(error.code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("'m'", error.message)
        self.assertIn("'1'", error.message)

    def test_unversioned_unavailable_message(self):
        """The UNAVAILABLE message of an unversioned model names no version."""
        self.registry.register(FakeWorker("w"), "m")
        self.registry.remove_worker("w")
        error = self.assertRaises(InferenceError, self.registry.pick_worker, self.registry.resolve("m"))
        self.assertEqual(error.code, grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(error.message, "model 'm' has no live worker")

    def test_remove_worker_returns_what_it_served(self):
        """remove_worker lists every (name, version) it left, and only those."""
        a, b = FakeWorker("a"), FakeWorker("b")
        self.registry.register(a, "m", "1")
        self.registry.register(a, "m", "2")
        self.registry.register(a, "n")
        self.registry.register(b, "m", "1")
        self.registry.register(b, "o")
        self.assertEqual(sorted(self.registry.remove_worker("a")), [("m", "1"), ("m", "2"), ("n", "")])
        self.assertEqual(self.registry.resolve("m", "1").workers, [b])
        self.assertEqual(self.registry.resolve("o").workers, [b])
        self.assertEqual(self.registry.remove_worker("a"), [])
        self.assertEqual(self.registry.remove_worker("unknown"), [])

    def test_other_workers_keep_serving(self):
        """Removing one of two workers leaves the model ready on the other."""
        a, b = FakeWorker("a"), FakeWorker("b")
        self.registry.register(a, "m")
        self.registry.register(b, "m")
        self.registry.remove_worker("a")
        model = self.registry.resolve("m")
        self.assertTrue(model.ready)
        for _ in range(3):
            self.assertIs(self.registry.pick_worker(model), b)

    def test_worker_returns(self):
        """A model left without workers becomes ready when one registers again."""
        self.registry.register(FakeWorker("w"), "m")
        self.registry.remove_worker("w")
        self.assertFalse(self.registry.all_ready())
        worker = FakeWorker("w2")
        self.registry.register(worker, "m")
        self.assertTrue(self.registry.is_ready("m"))
        self.assertIs(self.registry.pick_worker(self.registry.resolve("m")), worker)

    def test_unregister(self):
        """unregister withdraws one worker from one (name, version)."""
        a, b = FakeWorker("a"), FakeWorker("b")
        self.registry.register(a, "m", "1")
        self.registry.register(a, "m", "2")
        self.registry.register(b, "m", "1")
        self.assertTrue(self.registry.unregister("a", "m", "1"))
        self.assertEqual(self.registry.resolve("m", "1").workers, [b])
        self.assertEqual(self.registry.resolve("m", "2").workers, [a])
        # Not served (any more), unknown version, unknown model: False.
        self.assertFalse(self.registry.unregister("a", "m", "1"))
        self.assertFalse(self.registry.unregister("a", "m", "3"))
        self.assertFalse(self.registry.unregister("a", "zzz"))

    def test_unregister_last_forgets_model(self):
        """A model withdrawn by its only worker leaves at once: NOT_FOUND,
        and it no longer counts against all_ready."""
        self.registry.register(FakeWorker("a"), "m", "1")
        self.registry.register(FakeWorker("a"), "m", "2")
        self.registry.register(FakeWorker("b"), "n")
        self.registry.remove_worker("b")
        self.assertTrue(self.registry.unregister("a", "m", "1"))
        error = self.assertRaises(InferenceError, self.registry.resolve, "m", "1")
        self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(self.registry.versions("m"), ["2"])
        self.assertTrue(self.registry.unregister("a", "m", "2"))
        self.assertEqual(self.assertRaises(InferenceError, self.registry.resolve, "m").code,
                         grpc.StatusCode.NOT_FOUND)
        self.assertEqual(self.registry.versions("m"), [])
        self.assertEqual([m.name for m in self.registry.models()], ["n"])
        self.assertFalse(self.registry.all_ready())  # n's worker was lost, not withdrawn
        self.assertFalse(self.registry.unregister("a", "m", "2"))

    def test_all_ready(self):
        """all_ready is True only when every known model has a worker."""
        self.assertTrue(self.registry.all_ready())
        self.registry.register(FakeWorker("a"), "m")
        self.registry.register(FakeWorker("b"), "n", "1")
        self.assertTrue(self.registry.all_ready())
        self.registry.remove_worker("b")
        self.assertFalse(self.registry.all_ready())
        self.registry.register(FakeWorker("c"), "n", "1")
        self.assertTrue(self.registry.all_ready())


class RoutingTests(SynchronousTestCase):
    """pick_worker: least outstanding, ties rotate."""

    def setUp(self):
        self.registry = ModelRegistry()

    def model_with(self, *workers):
        for worker in workers:
            self.registry.register(worker, "m")
        return self.registry.resolve("m")

    def test_single_worker(self):
        """One worker is always picked, busy or not."""
        worker = FakeWorker("a", outstanding=100)
        model = self.model_with(worker)
        self.assertIs(self.registry.pick_worker(model), worker)

    def test_least_outstanding(self):
        """The worker with the fewest outstanding requests is picked."""
        a, b, c = FakeWorker("a", 5), FakeWorker("b", 1), FakeWorker("c", 3)
        model = self.model_with(a, b, c)
        for _ in range(6):
            self.assertIs(self.registry.pick_worker(model), b)

    def test_follows_outstanding(self):
        """Routing follows the counts as they change."""
        a, b = FakeWorker("a"), FakeWorker("b")
        model = self.model_with(a, b)
        for _ in range(6):
            worker = self.registry.pick_worker(model)
            worker.outstanding += 1
        # Each pick goes to the less loaded one, so load stays balanced.
        self.assertEqual((a.outstanding, b.outstanding), (3, 3))
        b.outstanding = 0
        self.assertIs(self.registry.pick_worker(model), b)

    def test_ties_rotate(self):
        """Two idle workers both get picked over consecutive requests."""
        a, b = FakeWorker("a"), FakeWorker("b")
        model = self.model_with(a, b)
        picked = {self.registry.pick_worker(model).worker_id for _ in range(2)}
        self.assertEqual(picked, {"a", "b"})

    def test_ties_rotate_among_least(self):
        """Among three workers, the two least loaded share the ties."""
        a, b, c = FakeWorker("a", 2), FakeWorker("b", 2), FakeWorker("c", 9)
        model = self.model_with(a, b, c)
        picks = [self.registry.pick_worker(model).worker_id for _ in range(6)]
        self.assertNotIn("c", picks)
        self.assertIn("a", picks)
        self.assertIn("b", picks)

    def test_ties_rotate_three_idle(self):
        """Three idle workers are each picked within a few requests."""
        workers = [FakeWorker(name) for name in "abc"]
        model = self.model_with(*workers)
        picked = {self.registry.pick_worker(model).worker_id for _ in range(3)}
        self.assertEqual(picked, {"a", "b", "c"})

    def test_ties_rotate_per_model(self):
        """Interleaved traffic for two models still rotates each model's idle workers.

        Requests for another model must not cancel out a model's rotation.
        """
        a1, b1 = FakeWorker("a1"), FakeWorker("b1")
        a2, b2 = FakeWorker("a2"), FakeWorker("b2")
        for worker in (a1, b1):
            self.registry.register(worker, "one")
        for worker in (a2, b2):
            self.registry.register(worker, "two")
        one, two = self.registry.resolve("one"), self.registry.resolve("two")
        picked_one, picked_two = set(), set()
        for _ in range(4):
            picked_one.add(self.registry.pick_worker(one).worker_id)
            picked_two.add(self.registry.pick_worker(two).worker_id)
        self.assertEqual(picked_one, {"a1", "b1"})
        self.assertEqual(picked_two, {"a2", "b2"})


class ModelConfigurationTests(SynchronousTestCase):
    """What a registration declares beyond tensors, and the statistics home."""

    def setUp(self):
        self.registry = ModelRegistry()

    def test_defaults(self):
        """A registration without configuration: Triton's defaults, and stats."""
        model = self.registry.register(FakeWorker("a"), "m")
        self.assertEqual(
            (model.decoupled, model.max_batch_size, model.preferred_batch_sizes, model.max_queue_delay_us),
            (False, 0, (), 0))
        self.assertEqual(model.stats.success_count, 0)

    def test_configuration_stored_latest_wins(self):
        """The batching and decoupled settings are stored, and replaced by a
        later registration; the statistics object survives it."""
        model = self.registry.register(FakeWorker("a"), "m", decoupled=True, max_batch_size=8,
                                       preferred_batch_sizes=[2, 4], max_queue_delay_us=100)
        self.assertEqual(
            (model.decoupled, model.max_batch_size, model.preferred_batch_sizes, model.max_queue_delay_us),
            (True, 8, (2, 4), 100))
        stats = model.stats
        stats.success(10, 0)
        again = self.registry.register(FakeWorker("b"), "m", max_batch_size=4)
        self.assertIs(again, model)
        self.assertEqual((model.decoupled, model.max_batch_size, model.preferred_batch_sizes), (False, 4, ()))
        self.assertIs(model.stats, stats)
        self.assertEqual(model.stats.success_count, 1)

    def test_each_version_has_its_own_stats(self):
        one = self.registry.register(FakeWorker("a"), "m", "1")
        two = self.registry.register(FakeWorker("a"), "m", "2")
        self.assertIsNot(one.stats, two.stats)

    def test_stats_survive_worker_loss(self):
        """A model's counts stay when its last worker goes and one returns."""
        model = self.registry.register(FakeWorker("a"), "m")
        model.stats.success(5, 0)
        self.registry.remove_worker("a")
        self.assertIs(self.registry.register(FakeWorker("b"), "m"), model)
        self.assertEqual(model.stats.success_count, 1)


class SelectAndIndexTests(SynchronousTestCase):
    """select() (ModelStatistics) and index() (RepositoryIndex)."""

    def setUp(self):
        self.registry = ModelRegistry()
        a, b = FakeWorker("a"), FakeWorker("b")
        for version in ("v10", "v2"):
            self.registry.register(a, "m", version)
        self.registry.register(b, "m", "v2")
        self.registry.register(a, "z")
        self.registry.register(FakeWorker("gone"), "k", "1")
        self.registry.remove_worker("gone")

    def keys(self, models):
        return [(m.name, m.version) for m in models]

    def test_select_everything(self):
        """No name: every known version, in name then natural version order,
        ready or not."""
        self.assertEqual(self.keys(self.registry.select()),
                         [("k", "1"), ("m", "v2"), ("m", "v10"), ("z", "")])

    def test_select_name(self):
        """A name alone: all its versions (not just the default one)."""
        self.assertEqual(self.keys(self.registry.select("m")), [("m", "v2"), ("m", "v10")])
        self.assertEqual(self.keys(self.registry.select("z")), [("z", "")])

    def test_select_version(self):
        self.assertEqual(self.keys(self.registry.select("m", "v2")), [("m", "v2")])

    def test_select_unknown(self):
        for args, message in [(("nope",), "Request for unknown model: 'nope' is not found"),
                              (("m", "v3"), "Request for unknown model: 'm' version 'v3' is not found"),
                              (("nope", "1"), "Request for unknown model: 'nope' version '1' is not found")]:
            error = self.assertRaises(InferenceError, self.registry.select, *args)
            self.assertEqual((error.code, error.message), (grpc.StatusCode.NOT_FOUND, message))

    def test_index_states_and_reasons(self):
        """READY names its workers; UNAVAILABLE says why."""
        self.assertEqual(
            [(m.name, m.version, m.state, m.reason) for m in self.registry.index()],
            [("k", "1", "UNAVAILABLE", "no live worker"),
             ("m", "v2", "READY", "2 workers: a, b"),
             ("m", "v10", "READY", "1 worker: a"),
             ("z", "", "READY", "1 worker: a")])

    def test_index_ready_only(self):
        self.assertEqual(self.keys(self.registry.index(ready_only=True)),
                         [("m", "v2"), ("m", "v10"), ("z", "")])


class UnloadTests(SynchronousTestCase):
    """A client's RepositoryModelUnload / Load of a worker-filled registry."""

    def setUp(self):
        self.registry = ModelRegistry()
        self.a = FakeWorker("a")
        for version in ("1", "2"):
            self.registry.register(self.a, "m", version)
        self.registry.register(self.a, "other")

    def assertUnloaded(self, model):
        self.assertFalse(model.ready)
        error = self.assertRaises(InferenceError, self.registry.pick_worker, model)
        self.assertEqual((error.code, error.message), (grpc.StatusCode.UNAVAILABLE, "model 'm' is unloaded"))

    def test_unload_stops_routing_every_version(self):
        unloaded = self.registry.unload("m")
        self.assertEqual([(m.name, m.version) for m in unloaded], [("m", "1"), ("m", "2")])
        for version in ("1", "2", ""):
            model = self.registry.resolve("m", version)  # still known: metadata and config answer
            self.assertUnloaded(model)
            self.assertFalse(self.registry.is_ready("m", version))
        # Other models are untouched.
        self.assertIs(self.registry.pick_worker(self.registry.resolve("other")), self.a)

    def test_unloaded_does_not_make_server_unready(self):
        self.registry.unload("m")
        self.assertTrue(self.registry.all_ready())
        self.registry.remove_worker("a")
        self.assertFalse(self.registry.all_ready())  # 'other' has no worker

    def test_registrations_stay_unrouted(self):
        """Workers keep registering an unloaded model (heartbeats stay
        healthy) but get nothing routed, new versions included."""
        b = FakeWorker("b")
        self.registry.register(b, "m", "1")
        self.registry.register(b, "m", "3")
        self.registry.unload("m")
        self.registry.register(FakeWorker("c"), "m", "1")
        self.registry.register(FakeWorker("c"), "m", "4")
        for version in ("1", "3", "4"):
            self.assertUnloaded(self.registry.resolve("m", version))
        self.assertEqual(self.registry.names_served_by("c"), {"m"})
        self.assertEqual(
            [(m.version, m.state, m.reason) for m in self.registry.index() if m.name == "m"],
            [("1", "UNAVAILABLE", "unloaded; 3 workers registered: a, b, c"),
             ("2", "UNAVAILABLE", "unloaded; 1 worker registered: a"),
             ("3", "UNAVAILABLE", "unloaded; 1 worker registered: b"),
             ("4", "UNAVAILABLE", "unloaded; 1 worker registered: c")])
        self.assertEqual(self.registry.index(ready_only=True), [self.registry.resolve("other")])

    def test_unloaded_without_worker(self):
        self.registry.unload("m")
        self.registry.remove_worker("a")
        self.assertEqual(self.registry.resolve("m", "1").reason, "unloaded")

    def test_load_admits_again(self):
        self.registry.unload("m")
        self.registry.register(FakeWorker("b"), "m", "5")
        loaded = self.registry.load("m")
        self.assertEqual([m.version for m in loaded], ["1", "2", "5"])
        for version in ("1", "2", "5"):
            model = self.registry.resolve("m", version)
            self.assertTrue(model.ready)
            self.registry.pick_worker(model)
        # Versions registered after loading are routed too.
        self.registry.register(FakeWorker("c"), "m", "6")
        self.assertTrue(self.registry.is_ready("m", "6"))

    def test_load_of_loaded_is_a_no_op(self):
        self.registry.load("m")
        self.assertTrue(self.registry.is_ready("m", "1"))

    def test_unknown_name(self):
        """Never registered: NOT_FOUND, and nothing is remembered."""
        for method in (self.registry.unload, self.registry.load):
            error = self.assertRaises(InferenceError, method, "nope")
            self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)
        self.registry.register(FakeWorker("b"), "nope")
        self.assertTrue(self.registry.is_ready("nope"))


class ForgettingTests(SynchronousTestCase):
    """A model whose last worker was lost is forgotten ``forget_after``
    seconds later, on the registry's clock, unless registered again."""

    def setUp(self):
        self.clock = Clock()
        self.registry = ModelRegistry(self.clock, forget_after=60.0)

    def known(self, name, version=""):
        try:
            self.registry.resolve(name, version)
        except InferenceError as e:
            self.assertEqual(e.code, grpc.StatusCode.NOT_FOUND)
            return False
        return True

    def test_lost_model_forgotten_after_the_delay(self):
        self.registry.register(FakeWorker("a"), "m", "1")
        self.registry.register(FakeWorker("b"), "n")
        self.registry.remove_worker("a")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(59.9)
        self.assertTrue(self.known("m", "1"))
        self.assertFalse(self.registry.is_ready("m", "1"))
        self.assertFalse(self.registry.all_ready())
        self.clock.advance(0.1)
        self.assertFalse(self.known("m", "1"))
        self.assertFalse(self.known("m"))
        self.assertEqual([m.name for m in self.registry.models()], ["n"])
        self.assertTrue(self.registry.all_ready())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_registered_again_meanwhile_stays(self):
        self.registry.register(FakeWorker("a"), "m")
        self.registry.remove_worker("a")
        self.clock.advance(30)
        self.registry.register(FakeWorker("a2"), "m")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertTrue(self.registry.is_ready("m"))
        # Lost again: a fresh full delay from then.
        self.registry.remove_worker("a2")
        self.clock.advance(59)
        self.assertTrue(self.known("m"))
        self.clock.advance(1)
        self.assertFalse(self.known("m"))

    def test_model_with_other_workers_is_not_scheduled(self):
        self.registry.register(FakeWorker("a"), "m")
        self.registry.register(FakeWorker("b"), "m")
        self.registry.remove_worker("a")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(120)
        self.assertTrue(self.registry.is_ready("m"))

    def test_withdrawn_while_waiting_goes_at_once(self):
        """A lost model then withdrawn by a late worker's UnregisterModel
        (its timer cancelled) and a model lost by two workers one after the
        other (one timer)."""
        self.registry.register(FakeWorker("a"), "m")
        self.registry.register(FakeWorker("b"), "m")
        self.registry.register(FakeWorker("c"), "n")
        self.registry.remove_worker("a")
        self.registry.remove_worker("c")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertTrue(self.registry.unregister("b", "m"))
        self.assertFalse(self.known("m"))
        self.clock.advance(60)
        self.assertFalse(self.known("n"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_forgotten_model_registered_again_is_new(self):
        """A name forgotten then registered again starts afresh (its
        statistics too); an unloaded name stays unloaded."""
        model = self.registry.register(FakeWorker("a"), "m")
        model.stats.success(1, 1)
        self.registry.unload("m")
        self.registry.remove_worker("a")
        self.clock.advance(60)
        self.assertFalse(self.known("m"))
        again = self.registry.register(FakeWorker("a"), "m")
        self.assertIsNot(again, model)
        self.assertFalse(again.admitted)
        self.assertEqual(again.outstanding, 0)

    def test_zero_forgets_at_once(self):
        registry = ModelRegistry(self.clock, forget_after=0)
        registry.register(FakeWorker("a"), "m")
        registry.register(FakeWorker("a"), "n", "1")
        self.assertEqual(sorted(registry.remove_worker("a")), [("m", ""), ("n", "1")])
        self.assertEqual(registry.models(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_cancels_and_schedules_no_more(self):
        self.registry.register(FakeWorker("a"), "m")
        self.registry.register(FakeWorker("b"), "n")
        self.registry.remove_worker("a")
        self.registry.close()
        self.registry.remove_worker("b")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.known("m"))
        self.assertTrue(self.known("n"))


class _Unscannable(dict):
    """A models table that fails the test if anything walks all of it."""

    def _scan(self, *args):
        raise AssertionError("scanned every model")

    __iter__ = items = values = keys = _scan


class PerWorkerIndexTests(SynchronousTestCase):
    """A heartbeat (names_served_by) and a lost worker (remove_worker) cost
    O(that worker's models), not O(every model)."""

    def setUp(self):
        self.registry = ModelRegistry(Clock())
        a, b = FakeWorker("a"), FakeWorker("b")
        self.registry.register(a, "m", "1")
        self.registry.register(a, "m", "2")
        self.registry.register(a, "n")
        self.registry.register(b, "n")
        self.registry.register(b, "o")
        self.registry._models = _Unscannable(self.registry._models)

    def test_names_served_by(self):
        self.assertEqual(self.registry.names_served_by("a"), {"m", "n"})
        self.assertEqual(self.registry.names_served_by("b"), {"n", "o"})
        self.assertEqual(self.registry.names_served_by("nobody"), set())
        self.registry.unregister("a", "m", "1")
        self.assertEqual(self.registry.names_served_by("a"), {"m", "n"})
        self.registry.unregister("a", "m", "2")
        self.assertEqual(self.registry.names_served_by("a"), {"n"})
        self.registry.unregister("a", "n")
        self.assertEqual(self.registry.names_served_by("a"), set())
        self.assertNotIn("a", self.registry._served)

    def test_remove_worker(self):
        self.assertEqual(self.registry.remove_worker("a"), [("m", "1"), ("m", "2"), ("n", "")])
        self.assertEqual(self.registry.names_served_by("a"), set())
        self.assertEqual(self.registry.remove_worker("a"), [])
        self.assertEqual(self.registry.names_served_by("b"), {"n", "o"})
        self.assertEqual(self.registry.resolve("n").workers[0].worker_id, "b")
