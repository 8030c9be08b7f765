"""The management token file (wire/credentials.py) and its check
(ingress/authentication.py)."""
import os
import stat

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from anyserve_tw.ingress.authentication import LOG_EVERY, TokenCheck
from anyserve_tw.wire import credentials, defaults


class TokenFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "mgmt.token")

    def test_created_private_then_reused(self):
        token = credentials.load_or_create_token(self.path)
        self.assertGreaterEqual(len(token), 40)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(credentials.load_or_create_token(self.path), token)
        self.assertEqual(credentials.read_token(self.path), token)

    def test_created_directory_is_private(self):
        path = os.path.join(self.dir, "sub", "mgmt.token")
        credentials.load_or_create_token(path)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)

    def test_new_token_each_time(self):
        """The ingress's own file gets a new token at each start: one a
        squatter on its port collected meanwhile is dead."""
        first = credentials.new_token(self.path)
        second = credentials.new_token(self.path)
        self.assertNotEqual(first, second)
        self.assertEqual(credentials.read_token(self.path), second)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.dir), ["mgmt.token"])  # no temporary left

    def test_directory_others_may_write_is_refused(self):
        shared = os.path.join(self.dir, "shared")
        os.mkdir(shared)
        os.chmod(shared, 0o777)
        for make in (credentials.new_token, credentials.load_or_create_token):
            e = self.assertRaises(credentials.TokenFileError, make, os.path.join(shared, "t"))
            self.assertIn("can be written by others (mode 777)", str(e))
        os.symlink(self.dir, os.path.join(self.dir, "link"))
        e = self.assertRaises(credentials.TokenFileError, credentials.new_token,
                              os.path.join(self.dir, "link", "t"))
        self.assertIn("is not a directory (a symlink?)", str(e))

    def write(self, content, mode=0o600):
        with open(self.path, "w") as f:
            f.write(content)
        os.chmod(self.path, mode)

    def test_unusable_files_refused_with_the_reason(self):
        self.write("t" * 43, 0o640)
        e = self.assertRaises(credentials.TokenFileError, credentials.read_token, self.path)
        self.assertIn("can be read or written by others (mode 640)", str(e))
        self.write("short")
        e = self.assertRaises(credentials.TokenFileError, credentials.load_or_create_token, self.path)
        self.assertIn("does not hold a token", str(e))
        os.unlink(self.path)
        os.mkfifo(self.path, 0o600)  # would block a reader without O_NONBLOCK
        e = self.assertRaises(credentials.TokenFileError, credentials.read_token, self.path)
        self.assertIn("is not a regular file", str(e))
        os.unlink(self.path)
        os.symlink("/etc/passwd", self.path)
        e = self.assertRaises(credentials.TokenFileError, credentials.read_token, self.path)
        self.assertIn("cannot open the token file", str(e))

    def test_worker_token_precedence(self):
        self.write("from-the-file-0123456789\n")
        environ = {defaults.ENV_TOKEN: "from-the-environment", defaults.ENV_TOKEN_FILE: self.path}
        self.assertEqual(credentials.worker_token(environ, "127.0.0.1:9000"), "from-the-environment")
        del environ[defaults.ENV_TOKEN]
        self.assertEqual(credentials.worker_token(environ, "127.0.0.1:9000"), "from-the-file-0123456789")

    def test_worker_token_default_file_by_port(self):
        self.patch(credentials, "runtime_dir", lambda: self.dir)
        self.assertIsNone(credentials.worker_token({}, "127.0.0.1:9123"))
        self.assertEqual(credentials.default_token_path(9123), os.path.join(self.dir, "mgmt-9123.token"))
        token = credentials.load_or_create_token(credentials.default_token_path(9123))
        self.assertEqual(credentials.worker_token({}, "127.0.0.1:9123"), token)
        self.assertIsNone(credentials.worker_token({}, "no-port"))
        # Never sent to another host unless given.
        self.assertIsNone(credentials.worker_token({}, "203.0.113.9:9123"))
        self.assertEqual(credentials.worker_token({}, "localhost:9123"), token)

    def test_metadata(self):
        self.assertEqual(credentials.metadata(None), ())
        self.assertEqual(credentials.metadata("abc"), (("authorization", "Bearer abc"),))


class TokenCheckTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.check = TokenCheck("secret-token-0123456789", self.clock)
        self.events = []
        self.check.log = Logger(observer=self.events.append)

    def test_allows_only_the_token(self):
        self.assertTrue(self.check.allows((("authorization", "Bearer secret-token-0123456789"),)))
        for metadata in ((), None, (("authorization", "Bearer secret-token-012345678"),),
                         (("authorization", "secret-token-0123456789"),),
                         (("x-other", "Bearer secret-token-0123456789"),)):
            self.assertFalse(self.check.allows(metadata), metadata)
        self.assertEqual(self.check.refused, 5)

    def test_refusals_logged_once_per_interval_with_their_count(self):
        for _ in range(50):
            self.check.allows(())
        self.assertEqual(len(self.events), 1)
        self.clock.advance(LOG_EVERY)
        self.check.allows(())
        self.assertEqual(len(self.events), 2)
        self.assertEqual(self.events[1]["count"], 50)
