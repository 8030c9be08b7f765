"""The model author's API: ``app = AnyServe()``, ``@app.model(...)``, ``app.run()``."""
import inspect

from twisted.internet.defer import Deferred, ensureDeferred

from anyserve_tw.wire.defaults import default_version
from anyserve_tw.wire.errors import not_found
from anyserve_tw.worker.model import Model
from anyserve_tw.worker.parsing import parse_request


class AnyServe:
    """A set of models served by one worker process.

    ``@app.model("cls", version="v1", inputs=[("x", "FP32", [-1, 4])],
    outputs=[("label", "INT64", [-1])])`` registers a handler.  A handler takes
    an :class:`~anyserve_tw.worker.model.InferRequest` and returns a dict of
    output name -> numpy array or list (or a single array when the model
    declares exactly one output).

    Where a handler runs: ``async def`` handlers, and ones marked
    ``asynchronous=True`` (returning a Deferred or a plain result), run on the
    worker's event loop.  Other plain functions run in a thread pool, off the
    loop, except while their recent run time stays within the worker's inline
    budget (about 0.2 ms): then they run on the loop and skip the thread hop.
    ``asynchronous=False`` keeps a handler in the pool always.

    Output arrays are sent from their own memory, not copied: a handler must
    not change an array after returning it.
    """

    def __init__(self):
        self.models = {}
        #: Functions :meth:`load` runs, in the order they were declared.
        self.load_hooks = []

    def model(self, name, version=None, inputs=None, outputs=None, platform="python",
              asynchronous=None, labels=None, max_batch_size=0, max_queue_delay_ms=0,
              preferred_batch_sizes=None):
        """Decorator registering a handler for (name, version).

        A generator (or async generator) handler is *decoupled*: it yields
        any number of responses per request, streamed through
        ModelStreamInfer.  ``labels`` (output name -> class labels by index)
        feed Triton's classification extension (``class_count``).

        ``max_batch_size`` > 0 turns on dynamic batching, with Triton's
        meanings: declared shapes leave out the batch dimension, a request
        brings ``[n, *shape]`` tensors (1 <= n <= max_batch_size), and the
        worker joins the requests that arrive together (up to
        ``max_batch_size`` rows, waiting at most ``max_queue_delay_ms`` from
        the first, at once on reaching one of ``preferred_batch_sizes``) into
        one call of the handler, whose outputs must have one row per input
        row.  See :mod:`anyserve_tw.worker.batching`.
        """

        def register(handler):
            model = Model(handler, name, version or "", inputs, outputs, platform, asynchronous,
                          labels=labels, max_batch_size=max_batch_size,
                          preferred_batch_sizes=preferred_batch_sizes,
                          max_queue_delay_ms=max_queue_delay_ms)
            if model.key in self.models:
                raise ValueError("model %s version %r registered twice" % (name, model.version))
            self.models[model.key] = model
            return handler

        return register

    def on_load(self, hook):
        """Decorator: ``hook()`` (plain or ``async def``) runs when the worker
        starts, before it registers any model, so the ingress routes to a
        model only once it is loaded.  If it raises, the worker exits with
        a non-zero code without registering."""
        self.load_hooks.append(hook)
        return hook

    def load(self):
        """A Deferred firing once every :meth:`on_load` hook has run, one
        after the other; failing with the first hook's exception."""
        hooks = list(self.load_hooks)

        async def run():
            for hook in hooks:
                result = hook()
                if isinstance(result, Deferred) or inspect.isawaitable(result):
                    await result

        return ensureDeferred(run())

    def route(self, request):
        """The Model for a request: its bytes, or the ParsedRequest the worker
        made of them (same default-version rule as the ingress)."""
        parsed = parse_request(request)
        name, version = parsed.name, parsed.version
        model = self.models.get((name, version))
        if model is None:
            if version:
                raise not_found(name, version)
            model = self.models[name, default_version(name, [v for (n, v) in self.models if n == name])]
        return model

    def handle(self, payload, model=None):
        """Serve one request synchronously: request bytes in, response bytes out.

        ``model`` is what :meth:`route` returned, if the caller has it already.
        Errors come out as :class:`InferenceError`; a handler's own exception
        becomes INTERNAL carrying its message.
        """
        parsed = parse_request(payload)
        if model is None:
            model = self.route(parsed)
        return b"".join(model.serve(parsed))

    def run(self, ingress=None, socket_path=None, worker_id=None, threads=None,
            heartbeat_interval=None):
        """Serve until SIGTERM/SIGINT; options default to ANYSERVE_* env vars."""
        # Imported here: the process machinery (reactor, grpc) is not part of
        # the authoring API, and importing a model module must not start it.
        from anyserve_tw.worker.main import run

        run(self, ingress=ingress, socket_path=socket_path, worker_id=worker_id,
            threads=threads, heartbeat_interval=heartbeat_interval)
