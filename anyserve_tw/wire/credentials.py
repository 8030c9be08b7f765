"""The management token: where it lives and how both processes read it.

Management calls carry the ingress's token (``authorization: Bearer ...``
metadata).  The token sits in a file only its owner can read, so on one host
the file's permissions are the access control, as they are for an SSH key or
a Unix socket: a process of another user cannot register, withdraw or
heartbeat anything.  At each start the ingress writes a fresh random token
to its default file (an operator's ``--mgmt-token-file`` is read if it
exists); it hands the token to the workers it supervises through their
environment; a standalone worker of the same user reads the same file, again
at each registration, so it joins an ingress that came back with a new
token.  A new token per start also means that a token a worker sent to
whatever squatted on the management port while the ingress was down (any
account can listen there then) is dead once the ingress is back.  Workers
look for the default file only when their ingress address is a loopback
one, so the token never travels to another host unless it is given.

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


def _private_directory(directory):
    """Make ``directory`` (0700) or check the one there: a real directory of
    ours that no one else may write to, else another account could swap the
    token file for a link and lock us out."""
    try:
        os.makedirs(directory, mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise TokenFileError("token directory %s is not a directory (a symlink?)" % directory)
    if st.st_uid != os.getuid():
        raise TokenFileError("token directory %s belongs to uid %d, not to this user (%d)"
                             % (directory, st.st_uid, os.getuid()))
    if st.st_mode & 0o022:
        raise TokenFileError("token directory %s can be written by others (mode %o)"
                             % (directory, stat.S_IMODE(st.st_mode)))


def new_token(path):
    """Write a fresh random token to ``path`` (a new 0600 file renamed into
    place, so no reader ever sees half a token) and return it."""
    _private_directory(os.path.dirname(os.path.abspath(path)))
    token = secrets.token_urlsafe(32)
    temporary = "%s.%s.tmp" % (path, secrets.token_hex(4))
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise TokenFileError("cannot create the token file %s: %s" % (path, e.strerror))
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(temporary, path)
    return token


def load_or_create_token(path):
    """An operator's token: read from ``path``, or made afresh and written
    there if there is none (see :func:`new_token`)."""
    _private_directory(os.path.dirname(os.path.abspath(path)))
    if os.path.lexists(path):
        return read_token(path)
    return new_token(path)


def is_loopback(host):
    """Whether ``host`` (of a ``host:port``) names this machine's loopback."""
    host = host.strip("[]").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


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
        # The default file is this host's: its token never goes elsewhere.
        port = port_of(ingress)
        if port is None or not is_loopback(ingress.rpartition(":")[0]):
            return None
        path = default_token_path(port)
        if not os.path.exists(path):
            return None
    return read_token(path)
