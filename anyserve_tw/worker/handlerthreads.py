"""Which model's handler gets the next pool thread, and what becomes of a
thread whose request was given up while its handler still runs.

A budget per model: a model may take a free thread only if another free
thread is left for the models holding none, unless it holds none itself.
So one model alone holds at most ``threads - 1`` threads, and a model that
holds none finds a thread as long as the busy models are fewer than the
threads.  A worker of a single model keeps no thread in reserve.  Waiting
requests are served model by model in turn (round robin), each model's in
arrival order.

A request whose deadline passes (or that is cancelled) while its handler
runs is answered at once, but Python cannot stop a thread: the handler runs
on.  Such a thread is *stuck*: it no longer counts against its model nor
against the pool's ``threads``, and the pool may start a thread in its place,
for up to ``max_stuck`` stuck threads (default twice ``threads``).  Past that,
each further stuck thread takes one of the ``threads`` away; once every
thread is stuck the worker is unhealthy (:meth:`HandlerThreads.healthy`),
requests that need a thread are refused with UNAVAILABLE at once instead of
queued behind handlers that may never return (those on the loop are still
served), and the worker's heartbeat should say so, for the ingress to stop
routing here and replace a supervised worker.  As stuck handlers return
their threads come back, and so does health.

Stuck threads are left behind at shutdown: the pool's threads are daemons.
"""
import threading
from collections import OrderedDict, deque

import grpc
from twisted.logger import Logger
from twisted.python.failure import Failure

from anyserve_tw.wire.errors import InferenceError

log = Logger()

#: Stuck threads replaced per thread of the pool, by default.
STUCK_PER_THREAD = 2

# A task's states.
WAITING, GIVEN, STARTED, DONE = range(4)


class Task:
    """One handler call: ``work()`` in a thread, then ``on_result(succeeded,
    result)`` on the loop, exactly once; ``result`` is None when the task
    was given up before it ran, or abandoned while it ran."""

    __slots__ = ("model", "work", "on_result", "state", "stuck", "reported", "abandoned_at")

    def __init__(self, model, work, on_result):
        self.model = model
        self.work = work
        self.on_result = on_result
        self.state = WAITING
        self.stuck = False
        self.reported = False  # on_result called
        self.abandoned_at = None


class HandlerThreads:
    """Hands pool threads to models' handlers; see the module docstring.

    ``pool`` is a ThreadPool (``callInThreadWithCallback``,
    ``adjustPoolsize``, ``max``): ``threads`` defaults to its ``max`` and
    its ``max`` grows by one per stuck thread replaced.  ``reactor`` needs
    ``callFromThread`` and ``seconds``.  ``shared()`` says whether several
    models share the threads (else none is kept in reserve).
    """

    def __init__(self, reactor, pool, threads=None, max_stuck=None, shared=lambda: True):
        self.reactor = reactor
        self.shared = shared
        self.pool = pool
        self.threads = pool.max if threads is None else threads
        self.max_stuck = STUCK_PER_THREAD * self.threads if max_stuck is None else max_stuck
        #: Threads holding a task (stuck ones included).
        self.occupied = 0
        #: Threads whose task was abandoned while its handler runs.
        self.stuck = 0
        #: Model -> threads it holds, stuck ones not counted.
        self.busy = {}
        #: Model -> its stuck threads (for the unhealthy reason).
        self.stuck_by_model = {}
        #: Model -> deque of its waiting tasks, models in serving order.
        self.waiting = OrderedDict()
        self._lock = threading.Lock()  # a task's state, between loop and thread

    # -- capacity ---------------------------------------------------------------

    @property
    def capacity(self):
        """Threads that may run tasks not (yet) stuck: ``threads``, less each
        stuck thread past ``max_stuck`` (those are not replaced)."""
        return self.threads - max(0, self.stuck - self.max_stuck)

    @property
    def free(self):
        return self.capacity - (self.occupied - self.stuck)

    def healthy(self):
        """False once every thread is stuck: nothing can run here any more."""
        return self.capacity > 0

    def reason(self):
        """Why the worker is unhealthy ("" if it is not)."""
        if self.healthy():
            return ""
        models = ", ".join("'%s': %d" % (model.name, count)
                           for model, count in sorted(self.stuck_by_model.items(),
                                                      key=lambda item: item[0].name))
        return ("all %d handler threads are stuck in handlers whose requests were given up "
                "(deadline or cancel): %s" % (self.stuck, models))

    def _unavailable(self):
        return Failure(InferenceError(grpc.StatusCode.UNAVAILABLE, "worker unavailable: " + self.reason()))

    def _may_take(self, model, free):
        return free >= 2 or (free >= 1 and (model not in self.busy or not self.shared()))

    # -- tasks ------------------------------------------------------------------

    def submit(self, model, work, on_result):
        """Run ``work()`` in a thread when ``model``'s budget allows; a Task
        to :meth:`cancel`.  Refused with UNAVAILABLE at once while unhealthy."""
        task = Task(model, work, on_result)
        if not self.healthy():
            task.state = DONE  # never queued: a later cancel() has nothing to do
            self._report(task, False, self._unavailable())
            return task
        if model not in self.waiting and self._may_take(model, self.free):
            self._give(task)
        else:
            queue = self.waiting.get(model)
            if queue is None:
                queue = self.waiting[model] = deque()
            queue.append(task)
        return task

    def cancel(self, task):
        """The request is given up: drop the task if waiting, skip it if no
        thread started it yet, else its thread is stuck.  The task's
        ``on_result`` gets None now unless it already ran."""
        with self._lock:
            state = task.state
            if state == GIVEN:
                task.state = DONE  # the thread skips it
        if state == WAITING:
            queue = self.waiting[task.model]
            queue.remove(task)
            if not queue:
                del self.waiting[task.model]
            task.state = DONE
        elif state == STARTED:
            self._stick(task)
        elif state == DONE:
            return
        self._report(task, True, None)

    def _give(self, task):
        task.state = GIVEN
        self.occupied += 1
        self.busy[task.model] = self.busy.get(task.model, 0) + 1
        self.pool.callInThreadWithCallback(
            lambda succeeded, result: self.reactor.callFromThread(self._finished, task, succeeded, result),
            self._in_thread, task)

    def _in_thread(self, task):
        with self._lock:
            if task.state != GIVEN:
                return None
            task.state = STARTED
        return task.work()

    def _finished(self, task, succeeded, result):
        self.occupied -= 1
        with self._lock:
            task.state = DONE
        if task.stuck:
            self._unstick(task)
        else:
            self._release(task.model)
        self._report(task, succeeded, result)
        self._dispatch()

    def _report(self, task, succeeded, result):
        if not task.reported:
            task.reported = True
            task.on_result(succeeded, result)

    def _release(self, model):
        count = self.busy[model] - 1
        if count:
            self.busy[model] = count
        else:
            del self.busy[model]

    # -- stuck threads ----------------------------------------------------------

    def _stick(self, task):
        was_healthy = self.healthy()
        task.stuck = True
        task.abandoned_at = self.reactor.seconds()
        self._release(task.model)
        self.stuck += 1
        self.stuck_by_model[task.model] = self.stuck_by_model.get(task.model, 0) + 1
        replaced = self.stuck <= self.max_stuck
        if replaced:
            self._resize()
        log.warn("model {model}'s handler runs on after its request was given up: its thread "
                 "is stuck ({stuck} stuck, {more})", model=task.model.name, stuck=self.stuck,
                 more="replaced" if replaced else "not replaced: %d replaced already" % self.max_stuck)
        if was_healthy and not self.healthy():
            log.error("worker unhealthy: {reason}", reason=self.reason())
            self._refuse_waiting()
        else:
            self._dispatch()

    def _unstick(self, task):
        was_healthy = self.healthy()
        replaced = self.stuck <= self.max_stuck
        self.stuck -= 1
        count = self.stuck_by_model[task.model] - 1
        if count:
            self.stuck_by_model[task.model] = count
        else:
            del self.stuck_by_model[task.model]
        if replaced:
            self._resize()
        log.info("model {model}'s stuck handler returned {seconds:.1f}s after its request was "
                 "given up ({stuck} still stuck)", model=task.model.name, stuck=self.stuck,
                 seconds=self.reactor.seconds() - task.abandoned_at)
        if not was_healthy and self.healthy():
            log.info("worker healthy again: a stuck handler returned")

    def _resize(self):
        """One pool thread per thread of the budget, plus one per stuck
        thread replaced."""
        self.pool.adjustPoolsize(maxthreads=self.threads + min(self.stuck, self.max_stuck))

    def _refuse_waiting(self):
        waiting, self.waiting = self.waiting, OrderedDict()
        error = self._unavailable()
        for queue in waiting.values():
            for task in queue:
                task.state = DONE
                self._report(task, False, error)

    # -- dispatch ---------------------------------------------------------------

    def _dispatch(self):
        """Give free threads to waiting tasks, model by model in turn."""
        free = self.free
        while free > 0 and self.waiting:
            for model in self.waiting:
                if self._may_take(model, free):
                    break
            else:
                return
            queue = self.waiting[model]
            task = queue.popleft()
            if queue:
                self.waiting.move_to_end(model)
            else:
                del self.waiting[model]
            self._give(task)
            free -= 1
