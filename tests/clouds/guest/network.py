"""The guests' networks: a network namespace of their own, with two bridges in it.

Bridge ``cluster`` carries ``CLUSTER_NETWORK``: every guest's first NIC, and one end of
a veth pair whose other end is in this (the test's) namespace with ``HOST_ADDRESS``, so
the test's Dask client reaches guests' ``10.77.0.x`` addresses as a client on a cloud
VPC would. Bridge ``outside`` carries ``OUTSIDE_NETWORK``: "the internet" as a guest
with egress sees it, with ``SERVICES_ADDRESS`` on the bridge itself, where the package
services (run in the namespace through :attr:`GuestNetwork.exec_prefix`) listen.

Nothing routes between the two bridges (IPv4 forwarding is off in the namespace) and
this namespace's end of the veth does not forward either: a guest on the cluster
network alone reaches neither the services nor the real internet. No guest has
user-mode networking. Everything lives in the namespace, so deleting it (after killing
what still runs in it) removes every bridge and tap at once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .common import CLUSTER_NETWORK, HOST_ADDRESS, OUTSIDE_NETWORK, SERVICES_ADDRESS

__all__ = ["CLUSTER_BRIDGE", "OUTSIDE_BRIDGE", "GuestNetwork", "NetworkUnavailable"]

CLUSTER_BRIDGE = "br-cluster"
OUTSIDE_BRIDGE = "br-outside"
_PREFIX = "dsc-guest-"
_VETH_PREFIX = "dscg"  # host end: dscg<pid>, at most 15 characters
_NS_VETH = "uplink"


class NetworkUnavailable(RuntimeError):
    """This machine cannot make the namespace (not root, no ``ip netns``...)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(namespace: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``namespace``."""
    result = _ip("netns", "pids", namespace, check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def _kill_all(namespace: str, grace: float = 3.0) -> None:
    """SIGTERM everything in ``namespace``, SIGKILL what is left after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while namespace_pids(namespace) and time.monotonic() < deadline:
            time.sleep(0.05)
    left = namespace_pids(namespace)
    if left:
        raise RuntimeError(f"processes {left} survive SIGKILL in namespace {namespace}")


def _remove(namespace: str, host_veth: str) -> None:
    _kill_all(namespace)
    _ip("link", "del", host_veth, check=False)
    _ip("netns", "del", namespace, check=False)


def _clean_stale() -> None:
    """Remove what a crashed earlier run left: namespaces and veths of dead owners."""
    listing = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listing:
        name = line.split(" ", 1)[0]
        owner = name.removeprefix(_PREFIX)
        if name.startswith(_PREFIX) and owner.isdigit() and not _alive(int(owner)):
            _remove(name, f"{_VETH_PREFIX}{owner}")
    for line in _ip("-o", "link", "show", "type", "veth", check=False).stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        owner = name.removeprefix(_VETH_PREFIX)
        if name.startswith(_VETH_PREFIX) and owner.isdigit() and not _alive(int(owner)):
            _ip("link", "del", name, check=False)


class GuestNetwork:
    """The namespace, its two bridges and the veth to this namespace; a context manager.

    One per test process (the namespace and veth are named after its pid, and the host
    end holds ``HOST_ADDRESS``). :meth:`tap` adds a guest's NIC to a bridge;
    :attr:`exec_prefix` runs any process inside the namespace.
    """

    def __init__(self) -> None:
        self.name = f"{_PREFIX}{os.getpid()}"
        self.host_veth = f"{_VETH_PREFIX}{os.getpid()}"
        self._indexes = itertools.count(1)
        self._taps: set[str] = set()
        self.active = False

    @property
    def exec_prefix(self) -> list[str]:
        """``ip netns exec NAME``: put it before a command to run that inside."""
        return ["ip", "netns", "exec", self.name]

    def unique_index(self) -> int:
        """A number not handed out before on this network (for tap names, MACs...)."""
        return next(self._indexes)

    def __enter__(self) -> GuestNetwork:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise NetworkUnavailable("guest networks need root (network namespaces, taps)")
        _clean_stale()
        _remove(self.name, self.host_veth)  # this pid's own leftovers, if any
        taken = _ip("-o", "-4", "addr", "show", check=False).stdout
        if f" {HOST_ADDRESS}/" in taken:
            # Not a reason to skip: two live test runs at once is a mistake to see.
            raise RuntimeError(
                f"{HOST_ADDRESS} is already in use here (another live test run?):\n{taken}"
            )
        result = _ip("netns", "add", self.name, check=False)
        if result.returncode != 0:
            raise NetworkUnavailable(f"cannot create a network namespace: {result.stderr}")
        self.active = True
        try:
            self._configure()
        except BaseException:
            self.close()
            raise

    def _configure(self) -> None:
        ns = self.name
        prefix = CLUSTER_NETWORK.prefixlen
        self.sysctl("net.ipv4.ip_forward", "0")
        self.sysctl("net.ipv6.conf.all.forwarding", "0")
        _ip("-n", ns, "link", "set", "lo", "up")
        for bridge in (CLUSTER_BRIDGE, OUTSIDE_BRIDGE):
            _ip("-n", ns, "link", "add", bridge, "type", "bridge")
            _ip("-n", ns, "link", "set", bridge, "up")
        services = f"{SERVICES_ADDRESS}/{OUTSIDE_NETWORK.prefixlen}"
        _ip("-n", ns, "addr", "add", services, "dev", OUTSIDE_BRIDGE)
        _ip("link", "add", self.host_veth, "type", "veth", "peer", "name", _NS_VETH, "netns", ns)
        _ip("-n", ns, "link", "set", _NS_VETH, "master", CLUSTER_BRIDGE, "up")
        # This end must never route a guest's packets on to the real network.
        with open(f"/proc/sys/net/ipv4/conf/{self.host_veth}/forwarding", "w") as f:
            f.write("0")
        _ip("addr", "add", f"{HOST_ADDRESS}/{prefix}", "dev", self.host_veth)
        _ip("link", "set", self.host_veth, "up")

    def sysctl(self, key: str, value: str) -> None:
        """Set ``key`` inside the namespace (its /proc/sys is its own)."""
        path = "/proc/sys/" + key.replace(".", "/")
        subprocess.run(
            [*self.exec_prefix, "sh", "-c", 'echo "$1" > "$2"', "sh", value, path],
            check=True,
            capture_output=True,
        )

    def sysctl_value(self, key: str) -> str:
        path = "/proc/sys/" + key.replace(".", "/")
        result = subprocess.run(
            [*self.exec_prefix, "cat", path], check=True, capture_output=True, text=True
        )
        return result.stdout.strip()

    def tap(self, name: str, bridge: str) -> str:
        """A tap ``name`` on ``bridge`` in the namespace, for a qemu run in it; returns name."""
        if bridge not in (CLUSTER_BRIDGE, OUTSIDE_BRIDGE):
            raise ValueError(f"no bridge {bridge!r} on this network")
        if len(name) > 15:
            raise ValueError(f"interface names have at most 15 characters: {name!r}")
        _ip("-n", self.name, "tuntap", "add", "dev", name, "mode", "tap")
        self._taps.add(name)
        _ip("-n", self.name, "link", "set", name, "master", bridge, "up")
        return name

    def remove_tap(self, name: str) -> None:
        if name in self._taps:
            self._taps.discard(name)
            _ip("-n", self.name, "link", "del", name, check=False)

    def pids(self) -> list[int]:
        """Processes running inside the namespace now."""
        return namespace_pids(self.name)

    def close(self) -> None:
        """Kill every process still in the namespace, then delete the veth and namespace."""
        if not self.active:
            return
        self.active = False
        self._taps.clear()
        _remove(self.name, self.host_veth)

    def exists(self) -> bool:
        """Whether the namespace or the host's veth end is still there."""
        named = Path("/run/netns", self.name).exists()
        return named or Path("/sys/class/net", self.host_veth).exists()
