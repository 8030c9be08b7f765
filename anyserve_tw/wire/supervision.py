"""What a supervising ingress and the workers it starts tell each other
outside the management API: the ingress's pid and two pipes.

- The *lifeline* is a pipe the ingress holds the only write end of and never
  writes to.  The worker reads it: end of file means the ingress is gone
  (even SIGKILLed), and the worker must exit rather than live on as an orphan
  that some later ingress would adopt.  Unlike a parent-death signal it needs
  no pid comparison, so there is no race with an ingress dying while the
  worker starts, and it survives a wrapper (a shell, ``env``) between them.
- The *status* pipe goes the other way: the worker writes one line when its
  script calls ``app.run()`` (:data:`RUNNING`) and one when its models are
  registered (:data:`REGISTERED`), so the ingress can tell a crash loop from
  a script that never serves, and knows which workers have registered.

Both ends are optional: a worker started any other way sees none of these
variables and behaves as before.
"""

#: The pid of the supervising ingress (also the worker's parent when nothing
#: sits between them, which is when the worker sets a parent-death signal).
ENV_SUPERVISOR_PID = "ANYSERVE_SUPERVISOR_PID"

#: The worker's file descriptor of the lifeline (it reads, never writes).
ENV_LIFELINE_FD = "ANYSERVE_LIFELINE_FD"

#: The worker's file descriptor of the status pipe (it writes lines).
ENV_STATUS_FD = "ANYSERVE_STATUS_FD"

#: The descriptor numbers the supervisor gives them (0-2 are stdio).
LIFELINE_FD = 3
STATUS_FD = 4

#: Status lines, each followed by ``\n``.
RUNNING = b"running"
REGISTERED = b"registered"

#: Longest status line the ingress reads; anything longer is dropped.
MAX_STATUS_LINE = 64

#: Seconds an orphaned worker gets to shut down cleanly before it exits
#: outright (a handler stuck in a thread would otherwise hold it forever).
ORPHAN_GRACE = 2.0
