"""The management token: where it lives and how both processes read it.

Management calls carry the ingress's token (``authorization: Bearer ...``
metadata).  The token sits in a file only its owner can read, so on one host
the file's permissions are the access control, as they are for an SSH key or
a Unix socket: a process of another user cannot register, withdraw or
heartbeat anything.  The ingress reads that file at start, or creates it
with a fresh random token; it hands the token to the workers it supervises
through their environment; a standalone worker of the same user reads the
same file, again at each registration, so an ingress that comes back with a
new token is joined again.

The default file is per management port under the user's runtime directory
(``$XDG_RUNTIME_DIR/anyserve``, else ``/tmp/anyserve-<uid>``), so two
ingresses on one host keep two tokens and a worker finds its ingress's
from the port in ``ANYSERVE_INGRESS`` alone.
"""
import os
import secrets
import stat

from anyserve_tw.wire import defaults

#: gRPC metadata key (lower case, as gRPC requires) and scheme of the token.
METADATA_KEY = "authorization"
SCHEME = "Bearer "

#: Shortest token accepted from a file someone wrote (a generated one has 43
#: characters: 32 random bytes).
MIN_TOKEN_LENGTH = 16
#: Longest token file read.
MAX_TOKEN_FILE = 4096


class TokenFileError(Exception):
    """The token file is missing, unreadable, or readable by others."""


def runtime_dir():
    """The user's private directory for AnyServe's tokens."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "anyserve")
    return os.path.join("/tmp", "anyserve-%d" % os.getuid())


def default_token_path(mgmt_port):
    """Where the ingress on management port ``mgmt_port`` keeps its token."""
    return os.path.join(runtime_dir(), "mgmt-%d.token" % int(mgmt_port))


def port_of(address):
    """The port of a ``host:port`` address, or None."""
    host, _, port = address.rpartition(":")
    return int(port) if host and port.isdigit() else None


def metadata(token):
    """The call metadata carrying ``token`` (empty without one)."""
    return () if not token else ((METADATA_KEY, SCHEME + token),)


def _check_private(st, what, path):
    if st.st_uid != os.getuid():
        raise TokenFileError("%s %s belongs to uid %d, not to this user (%d)"
                             % (what, path, st.st_uid, os.getuid()))
    if st.st_mode & 0o077:
        raise TokenFileError("%s %s can be read or written by others (mode %o): chmod go= it"
                             % (what, path, stat.S_IMODE(st.st_mode)))


def read_token(path):
    """The token in ``path``; :class:`TokenFileError` unless the file is
    a regular file of ours that no one else can read, holding a token."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise TokenFileError("cannot open the token file %s: %s" % (path, e.strerror))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError("token file %s is not a regular file" % path)
        _check_private(st, "token file", path)
        token = os.read(fd, MAX_TOKEN_FILE).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise TokenFileError("token file %s does not hold a token (one line of at least %d "
                             "characters)" % (path, MIN_TOKEN_LENGTH))
    return token


def load_or_create_token(path):
    """The ingress's token: read from ``path``, or made afresh and written
    there (mode 0600, its directory 0700 when we create it)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if directory == runtime_dir():
            _check_private(os.stat(directory), "token directory", directory)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_token(path)
    except OSError as e:
        raise TokenFileError("cannot create the token file %s: %s" % (path, e.strerror))
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def worker_token(environ, ingress):
    """The token a worker sends to ``ingress``: ``ANYSERVE_TOKEN``, else the
    file ``ANYSERVE_TOKEN_FILE`` names, else the default file for the
    ingress's port if it exists; None when there is none.  Raises
    :class:`TokenFileError` for a file that is there but unusable."""
    token = environ.get(defaults.ENV_TOKEN)
    if token:
        return token
    path = environ.get(defaults.ENV_TOKEN_FILE)
    if not path:
        port = port_of(ingress)
        if port is None:
            return None
        path = default_token_path(port)
        if not os.path.exists(path):
            return None
    return read_token(path)
