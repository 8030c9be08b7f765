"""Hosts made of Linux network namespaces, for tests across hosts.

:class:`Hosts` makes one namespace per host, each joined to a hub host by
its own veth pair and /24 (10.77.N.0/24: hub .1, host .2), plus a link from
the test's own namespace to the hub, so the test can act as a client.  No
address is set anywhere but in these namespaces and on the test's end of
that one link; everything is removed by :meth:`Hosts.destroy`, which also
kills whatever still runs in them (call it from a cleanup, so a failing
test tears down too).

Needs root and ``ip``; :func:`unavailable_reason` says why not, for a skip.
"""
import os
import random
import shutil
import signal
import subprocess
import time

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args, namespace=None, check=True):
    command = [IP] + (["-n", namespace] if namespace else []) + list(args)
    return subprocess.run(command, check=check, capture_output=True, text=True)


def unavailable_reason():
    """Why namespaces can't be made here, or None if they can (tries one)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists(IP):
        return "no 'ip' command (iproute2)"
    name = "as-probe-%d" % os.getpid()
    probe = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return "cannot create a network namespace: %s" % probe.stderr.strip()
    subprocess.run([IP, "netns", "del", name], capture_output=True)
    return None


class Hosts:
    """A hub namespace and ``names`` hosts around it.

    ``address(name)`` is a host's address on its link to the hub,
    ``hub_address(name)`` the hub's on that same link, ``client_address``
    the hub's address on the link from the test's namespace."""

    def __init__(self, names, hub="hub"):
        self.tag = "as%d%d" % (os.getpid() % 100000, random.randrange(100))
        # One /24 per link; the third octet picked at random, so two runs at
        # once (or a leftover of a killed run) do not collide.
        self.base = random.randrange(1, 250 - len(names))
        self.hub = hub
        self.names = list(names)
        self._namespaces = []
        self._root_links = []
        self.addresses = {}
        self.hub_addresses = {}
        try:
            self._build()
        except Exception:
            self.destroy()
            raise

    def namespace(self, name):
        return "%s-%s" % (self.tag, name)

    def _subnet(self, index):
        return "10.77.%d" % (self.base + index)

    def _add_namespace(self, name):
        namespace = self.namespace(name)
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("link", "set", "lo", "up", namespace=namespace)
        return namespace

    def _build(self):
        hub = self._add_namespace(self.hub)
        # The test's own end: a veth pair from here to the hub.
        here, there = "%sc0" % self.tag, "%sc1" % self.tag
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        self._root_links.append(here)
        _ip("link", "set", there, "netns", hub)
        subnet = self._subnet(0)
        _ip("addr", "add", subnet + ".1/24", "dev", here)
        _ip("link", "set", here, "up")
        _ip("addr", "add", subnet + ".2/24", "dev", there, namespace=hub)
        _ip("link", "set", there, "up", namespace=hub)
        self.client_address = subnet + ".2"
        for index, name in enumerate(self.names, 1):
            namespace = self._add_namespace(name)
            a, b = "%sh%d" % (self.tag, index), "%sw%d" % (self.tag, index)
            _ip("link", "add", a, "type", "veth", "peer", "name", b, namespace=hub)
            _ip("link", "set", b, "netns", namespace, namespace=hub)
            subnet = self._subnet(index)
            _ip("addr", "add", subnet + ".1/24", "dev", a, namespace=hub)
            _ip("link", "set", a, "up", namespace=hub)
            _ip("addr", "add", subnet + ".2/24", "dev", b, namespace=namespace)
            _ip("link", "set", b, "up", namespace=namespace)
            self.addresses[name] = subnet + ".2"
            self.hub_addresses[name] = subnet + ".1"
            self.hub_links = getattr(self, "hub_links", {})
            self.hub_links[name] = a

    def address(self, name):
        return self.addresses[name]

    def hub_address(self, name):
        return self.hub_addresses[name]

    def command(self, name, argv):
        """``argv`` run inside host ``name`` (the hub's name for the hub)."""
        return [IP, "netns", "exec", self.namespace(name)] + list(argv)

    def pids(self, name):
        result = _ip("netns", "pids", self.namespace(name), check=False)
        return [int(p) for p in result.stdout.split()]

    def kill(self, name, sig=signal.SIGKILL):
        """Kill every process of host ``name``, as if it died; the pids killed."""
        pids = self.pids(name)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def link(self, name, up):
        """Take host ``name``'s link to the hub down (a pulled cable: no
        packet either way, no reset) or up again."""
        _ip("link", "set", self.hub_links[name], "up" if up else "down", namespace=self.namespace(self.hub))

    def destroy(self):
        """Kill what runs in the namespaces, then remove them and the links."""
        for namespace in self._namespaces:
            result = _ip("netns", "pids", namespace, check=False)
            for pid in result.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.monotonic() + 5
        for namespace in self._namespaces:
            while _ip("netns", "pids", namespace, check=False).stdout.split() and time.monotonic() < deadline:
                time.sleep(0.05)
        for link in self._root_links:
            _ip("link", "del", link, check=False)
        for namespace in reversed(self._namespaces):
            _ip("netns", "del", namespace, check=False)
        self._namespaces, self._root_links = [], []
