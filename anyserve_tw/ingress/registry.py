"""The model registry: which workers serve which (model, version).

Owned by the reactor thread: every read and write happens there (gRPC threads
reach it through :mod:`anyserve_tw.ingress.bridge`), so it needs no lock.

The registry forgets, so that it cannot only grow and ServerReady is not
false for ever because of a model nobody serves any more:

- a model *withdrawn* by its last worker (UnregisterModel, which a worker
  sends when it exits cleanly) leaves at once: requests for it get NOT_FOUND;
- a model whose last worker was *lost* (crashed, disconnected, evicted for
  silence) stays known but not ready for ``forget_after`` seconds, its
  requests getting UNAVAILABLE ("try again": a supervised worker is usually
  back within seconds), then leaves, unless a worker registers it meanwhile.
  Without a clock (``clock=None``) such a model stays known.

Each ModelVersion counts its requests in flight (``outstanding``), which the
router compares with its per-model cap.

Requests naming no version follow :func:`anyserve_tw.wire.defaults.default_version`,
the rule the workers use too.

Triton's model-repository extension maps onto this registry as follows:
workers fill it (a model is "loaded" by a worker registering it), and a
client may *unload* a model by name (RepositoryModelUnload): every version of
it then stops being routed, its requests get UNAVAILABLE ``model 'x' is
unloaded`` and ModelReady is false, while requests already forwarded finish
and registrations keep arriving (their workers are recorded, not routed to,
so heartbeats stay healthy).  *Loading* it again (RepositoryModelLoad)
admits it back.  The admitted flag lives on each ModelVersion, so routing
checks one attribute per request; an unloaded name stays unloaded for
versions registered later, and does not keep ServerReady false.
"""
from anyserve_tw.ingress.statistics import InferenceStats
from anyserve_tw.wire.defaults import default_version, natural_key
from anyserve_tw.wire.errors import InferenceError, not_found, unavailable

#: RepositoryIndex states (Triton's names).
READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


class ModelVersion:
    """One (name, version): what its workers declared, the workers serving
    it, whether it is admitted (not unloaded) and its statistics.

    ``decoupled``, ``max_batch_size``, ``preferred_batch_sizes`` and
    ``max_queue_delay_us`` mean what they do in Triton's model configuration.
    """

    def __init__(self, name, version, admitted=True):
        self.name = name
        self.version = version
        self.platform = ""
        self.inputs = ()
        self.outputs = ()
        self.decoupled = False
        self.max_batch_size = 0
        self.preferred_batch_sizes = ()
        self.max_queue_delay_us = 0
        self.workers = []
        self.rotation = 0  # where the next tie-break starts
        #: False while a client has it unloaded.
        self.admitted = admitted
        self.stats = InferenceStats()
        #: Requests forwarded and not yet answered (the router keeps it).
        self.outstanding = 0
        #: The pending call that forgets it, while it has no worker.
        self.forget_call = None

    @property
    def ready(self):
        return self.admitted and bool(self.workers)

    @property
    def state(self):
        """READY or UNAVAILABLE, as RepositoryIndex reports it."""
        return READY if self.ready else UNAVAILABLE

    @property
    def reason(self):
        """Why it is in its state, naming its workers: ``2 workers: w1, w2``
        (READY), ``unloaded`` (with the workers still registered, if any) or
        ``no live worker``."""
        count = len(self.workers)
        if not count:
            return "no live worker" if self.admitted else "unloaded"
        workers = "%d worker%s%s: %s" % (
            count, "" if count == 1 else "s", "" if self.admitted else " registered",
            ", ".join(w.worker_id for w in self.workers),
        )
        return workers if self.admitted else "unloaded; " + workers

    def __repr__(self):
        return "<ModelVersion %s:%s workers=%d%s>" % (
            self.name, self.version, len(self.workers), "" if self.admitted else " unloaded")


class ModelRegistry:
    """Maps (name, version) to workers; routes by least outstanding requests.

    Workers are any objects with a ``worker_id`` and an ``outstanding`` count
    (requests sent, not yet answered).  See the module docstring for
    forgetting, unloading and loading.  ``clock``: an IReactorTime that
    times ``forget_after`` (None: lost models are never forgotten).
    """

    def __init__(self, clock=None, forget_after=60.0):
        self._models = {}  # name -> {version: ModelVersion}
        self._unloaded = set()  # names a client unloaded
        #: worker_id -> {ModelVersion: None} (an ordered set), so that a
        #: heartbeat or a lost worker costs O(its models), not O(all models).
        self._served = {}
        self.clock = clock
        self.forget_after = forget_after

    def register(self, worker, name, version="", platform="", inputs=(), outputs=(),
                 decoupled=False, max_batch_size=0, preferred_batch_sizes=(), max_queue_delay_us=0):
        """Add ``worker`` as a server of (name, version); what it declares
        (platform, tensor specs, the batching and decoupled settings)
        replaces what earlier registrations declared."""
        model = self._models.setdefault(name, {}).get(version)
        if model is None:
            model = self._models[name][version] = ModelVersion(
                name, version, admitted=name not in self._unloaded)
        model.platform = platform
        model.inputs = tuple(inputs)
        model.outputs = tuple(outputs)
        model.decoupled = bool(decoupled)
        model.max_batch_size = max_batch_size
        model.preferred_batch_sizes = tuple(preferred_batch_sizes)
        model.max_queue_delay_us = max_queue_delay_us
        if all(w.worker_id != worker.worker_id for w in model.workers):
            model.workers.append(worker)
            self._served.setdefault(worker.worker_id, {})[model] = None
        if model.forget_call is not None:
            model.forget_call.cancel()
            model.forget_call = None
        return model

    def unregister(self, worker_id, name, version=""):
        """Withdraw one worker from (name, version); False if it did not serve it.

        The model leaves the registry with its last worker (a deliberate
        withdrawal, unlike a lost worker: see the module docstring)."""
        model = self._models.get(name, {}).get(version)
        if model is None:
            return False
        before = len(model.workers)
        model.workers = [w for w in model.workers if w.worker_id != worker_id]
        if len(model.workers) == before:
            return False
        served = self._served[worker_id]
        del served[model]
        if not served:
            del self._served[worker_id]
        if not model.workers:
            self._drop(model)
        return True

    def remove_worker(self, worker_id):
        """Withdraw a lost worker from everything; return the (name, version)
        it served.  A model left without a worker is forgotten after
        ``forget_after`` seconds unless registered again."""
        removed = []
        for model in self._served.pop(worker_id, ()):
            model.workers = [w for w in model.workers if w.worker_id != worker_id]
            removed.append((model.name, model.version))
            if not model.workers:
                self._orphaned(model)
        return removed

    def _orphaned(self, model):
        if self.clock is None or model.forget_call is not None:
            return
        if self.forget_after <= 0:
            self._drop(model)
        else:
            model.forget_call = self.clock.callLater(self.forget_after, self._forget, model)

    def _forget(self, model):
        model.forget_call = None
        if not model.workers:
            self._drop(model)

    def _drop(self, model):
        """Take ``model`` out of the registry (if it is still the one there)."""
        if model.forget_call is not None:
            model.forget_call.cancel()
            model.forget_call = None
        versions = self._models.get(model.name)
        if versions is None or versions.get(model.version) is not model:
            return
        del versions[model.version]
        if not versions:
            del self._models[model.name]

    def close(self):
        """Cancel every pending forgetting and schedule no more (the
        ingress is stopping): nothing is left on the clock."""
        self.clock = None
        for model in self.models():
            if model.forget_call is not None:
                model.forget_call.cancel()
                model.forget_call = None

    def get(self, name, version=""):
        """Exactly (name, version) (no default-version rule), or None."""
        return self._models.get(name, {}).get(version)

    def served_count(self, worker_id):
        """How many (name, version) ``worker_id`` serves, in O(1)."""
        return len(self._served.get(worker_id, ()))

    def names_served_by(self, worker_id):
        """Names of the models ``worker_id`` serves (any version)."""
        return {model.name for model in self._served.get(worker_id, ())}

    def versions(self, name):
        """Every known version of ``name`` in natural order (empty if unknown)."""
        return sorted(self._models.get(name, {}), key=natural_key)

    def default_version(self, name):
        return default_version(name, self._models.get(name, ()))

    def resolve(self, name, version=""):
        """The ModelVersion a request for (name, version) goes to, or NOT_FOUND."""
        versions = self._models.get(name)
        if not versions:
            raise not_found(name)
        if not version:
            version = self.default_version(name)
        model = versions.get(version)
        if model is None:
            raise not_found(name, version)
        return model

    def pick_worker(self, model):
        """The worker of ``model`` with the fewest outstanding requests.

        Ties rotate, so idle workers take turns instead of the first one
        receiving all light traffic.  UNAVAILABLE when no worker is left or
        the model is unloaded.
        """
        if not model.admitted:
            raise unavailable("model '%s' is unloaded" % model.name)
        workers = model.workers
        count = len(workers)
        if count == 0:
            raise unavailable(
                "model '%s'%s has no live worker"
                % (model.name, " version '%s'" % model.version if model.version else "")
            )
        if count == 1:
            return workers[0]
        start = model.rotation % count
        model.rotation += 1
        best = None
        for i in range(count):
            worker = workers[(start + i) % count]
            if best is None or worker.outstanding < best.outstanding:
                best = worker
        return best

    def is_ready(self, name, version=""):
        try:
            return self.resolve(name, version).ready
        except InferenceError:
            return False

    def models(self):
        """Every known ModelVersion."""
        return [m for versions in self._models.values() for m in versions.values()]

    def all_ready(self):
        """True when every known model not unloaded has a live worker."""
        return all(model.ready for model in self.models() if model.admitted)

    def select(self, name="", version=""):
        """The ModelVersions a statistics request names, in name then natural
        version order: every known one (no name), every version of ``name``
        (no version), or exactly (name, version); NOT_FOUND if none."""
        if not name:
            return [model for n in sorted(self._models) for model in self._sorted(n)]
        if version:
            model = self._models.get(name, {}).get(version)
            if model is None:
                raise not_found(name, version)
            return [model]
        if not self._models.get(name):
            raise not_found(name)
        return self._sorted(name)

    def _sorted(self, name):
        versions = self._models[name]
        return [versions[v] for v in sorted(versions, key=natural_key)]

    def index(self, ready_only=False):
        """Every known ModelVersion (only the READY ones with ``ready_only``)
        in name then natural version order, for RepositoryIndex."""
        return [model for model in self.select() if model.ready or not ready_only]

    def unload(self, name):
        """Stop routing every version of ``name`` (now and as registered
        later); its ModelVersions.  NOT_FOUND if never registered."""
        return self._admit(name, False)

    def load(self, name):
        """Route ``name`` again after :meth:`unload` (a no-op if it was
        not unloaded); its ModelVersions.  NOT_FOUND if never registered."""
        return self._admit(name, True)

    def _admit(self, name, admitted):
        if not self._models.get(name):
            raise not_found(name)
        if admitted:
            self._unloaded.discard(name)
        else:
            self._unloaded.add(name)
        models = self._sorted(name)
        for model in models:
            model.admitted = admitted
        return models
