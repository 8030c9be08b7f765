"""The model registry: which workers serve which (model, version).

Owned by the reactor thread: every read and write happens there (gRPC threads
reach it through :mod:`anyserve_tw.ingress.bridge`), so it needs no lock.

A model stays known after its last worker is gone: it is then *not ready* and
requests for it get UNAVAILABLE rather than NOT_FOUND, so clients can tell "try
again" from "no such model".

Requests naming no version follow :func:`anyserve_tw.wire.defaults.default_version`,
the rule the workers use too.
"""
from anyserve_tw.wire.defaults import default_version, natural_key
from anyserve_tw.wire.errors import InferenceError, not_found, unavailable


class ModelVersion:
    """One (name, version), its tensor metadata and the workers serving it."""

    def __init__(self, name, version):
        self.name = name
        self.version = version
        self.platform = ""
        self.inputs = ()
        self.outputs = ()
        self.workers = []
        self.rotation = 0  # where the next tie-break starts

    @property
    def ready(self):
        return bool(self.workers)

    def __repr__(self):
        return "<ModelVersion %s:%s workers=%d>" % (self.name, self.version, len(self.workers))


class ModelRegistry:
    """Maps (name, version) to workers; routes by least outstanding requests.

    Workers are any objects with a ``worker_id`` and an ``outstanding`` count
    (requests sent, not yet answered).
    """

    def __init__(self):
        self._models = {}  # name -> {version: ModelVersion}

    def register(self, worker, name, version="", platform="", inputs=(), outputs=()):
        """Add ``worker`` as a server of (name, version); metadata: latest wins."""
        model = self._models.setdefault(name, {}).get(version)
        if model is None:
            model = self._models[name][version] = ModelVersion(name, version)
        model.platform = platform
        model.inputs = tuple(inputs)
        model.outputs = tuple(outputs)
        if all(w.worker_id != worker.worker_id for w in model.workers):
            model.workers.append(worker)
        return model

    def unregister(self, worker_id, name, version=""):
        """Withdraw one worker from (name, version); False if it did not serve it."""
        model = self._models.get(name, {}).get(version)
        if model is None:
            return False
        before = len(model.workers)
        model.workers = [w for w in model.workers if w.worker_id != worker_id]
        return len(model.workers) != before

    def remove_worker(self, worker_id):
        """Withdraw a worker from everything; return the (name, version) it served."""
        removed = []
        for name, versions in self._models.items():
            for version, model in versions.items():
                if any(w.worker_id == worker_id for w in model.workers):
                    model.workers = [w for w in model.workers if w.worker_id != worker_id]
                    removed.append((name, version))
        return removed

    def names_served_by(self, worker_id):
        """Names of the models ``worker_id`` serves (any version)."""
        return {
            name
            for name, versions in self._models.items()
            for model in versions.values()
            if any(w.worker_id == worker_id for w in model.workers)
        }

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
        receiving all light traffic.  UNAVAILABLE when no worker is left.
        """
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
        """True when every known model has at least one live worker."""
        return all(model.ready for model in self.models())
