"""Lab nodes that run as qemu guests (``engine: kernel``): a real kernel with a WireGuard module.

A kernel node keeps its network namespace (``wkl-<lab>.<node>``, with the same ``eth0`` on the
site LAN and ``mgmt`` to the management hub as every node), but the namespace becomes a shell:
its addresses are removed, ``eth0`` is bridged with a tap ``vmlan`` and ``mgmt`` with a tap
``vmmgmt``, and qemu runs in it (in the foreground, recorded by PID as the node's *holder*).
The guest takes the node's LAN address, default gateway and management address on NICs it
renames to ``eth0`` and ``mgmt``, so it sits behind the same NAT router and reaches the API
server over the same management path as every other node.  Nothing is created in the host's
network namespace, and qemu has no user-mode networking: its only NICs are the two taps.

Guest (``ci/build-vm.sh`` builds the pieces into ``$WIREKUBE_CACHE/vm/current``): a Debian
kernel, and an initramfs whose ``/init`` (``vm_init.sh``) mounts the host's root read-only over
9p, tmpfs over ``/run``, ``/tmp`` and ``/var/tmp``, the lab's workdir read-write at its own path
(kubeconfig, agent state dirs), and then runs :func:`guest_main` with the host's Python inside
a chroot.  :func:`guest_main` loads the modules (wireguard, nf_tables, ...), configures the
network, forwards ``127.0.0.1:6443`` to the routed API address (so the node kubeconfig works
unchanged), and serves commands.

Command channel: a TCP server on the guest's management address (port :data:`COMMAND_PORT`),
reached from the management hub namespace, which is on the other end of the node's ``mgmt``
link.  Each connection runs one command; a random token (``<workdir>/net/vm-<node>.token``,
0600, read by the guest through the shared workdir) authenticates it.  Frames: one type byte,
a 4-byte big-endian length, the payload.  Client to guest: ``h`` (JSON header: token, argv),
``i`` (stdin bytes), ``e`` (stdin closed), ``s`` (a signal number to deliver).  Guest to
client: ``o``/``r`` (stdout/stderr bytes), ``x`` (exit code, or ``-signal``).  If the client
goes away before ``x`` the command's process group is killed (SIGKILL): a host-side ``kill -9``
of the client is a ``kill -9`` in the guest.  So ``Lab.exec``/``spawn`` run the client
(``python -m wirekube.lab.vm exec``) on the host, and supervision, ``stop`` and ``down`` work
on it by PID like on any other process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wirekube.errors import WireKubeError

COMMAND_PORT = 7847
API_FORWARD_PORT = 6443
TAP_LAN = "vmlan"
TAP_MGMT = "vmmgmt"
BRIDGE_LAN = "brlan"
BRIDGE_MGMT = "brmgmt"
MEMORY_MIB = 512
QEMU_NICE = -10
"""qemu runs at this nice value: an emulated guest's timers, probes and heartbeats fall behind
on a busy host long before native processes do (measured: at a host load average of ~20 on 2
cores, TCG guests at nice 0 answered a command only after minutes), so the lab lets it go
first; it uses about a third of a core per guest once its agent runs."""
BOOT_TIMEOUT_S = 240.0
"""Measured: ~20 s from qemu start to a ready command server with one guest on an idle core
(TCG); three guests booting together on 2 shared cores take up to ~60 s."""
GUEST_MODULES = ("wireguard", "nf_tables", "nft_chain_nat", "nft_masq", "nft_ct", "nft_nat")
MAX_FRAME = 1 << 20
_HDR = struct.Struct(">cI")


class VMError(WireKubeError):
    """A kernel node's VM could not be started, reached or used."""


def cache_dir() -> Path:
    return Path(os.environ.get("WIREKUBE_CACHE", str(Path.home() / ".cache" / "wirekube"))) / "vm" / "current"


@dataclass(frozen=True)
class GuestPieces:
    kernel: Path
    initrd: Path
    modules: Path
    """The ``-d`` directory for modprobe (holds ``lib/modules/<version>``)."""


def guest_pieces() -> GuestPieces:
    base = cache_dir()
    pieces = GuestPieces(base / "vmlinuz", base / "initrd.img", base / "modules")
    if not pieces.kernel.exists() or not pieces.initrd.exists():
        raise VMError(f"no guest kernel in {base}: kernel nodes need `bash ci/build-vm.sh` (part of `make setup`)")
    if _qemu() is None:
        raise VMError("qemu-system-x86_64 not found: kernel nodes need `bash ci/build-vm.sh` (part of `make setup`)")
    return pieces


def _qemu() -> str | None:
    for candidate in ("/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


# ---- host side: the node namespace as a shell, qemu, readiness ------------------------------------


@dataclass(frozen=True)
class GuestConfig:
    """What the guest needs to become the node (JSON in ``<workdir>/net/vm-<node>.json``)."""

    node: str
    lan_address: str  # "192.168.2.10/24"
    gateway: str
    mgmt_address: str
    api_address: str
    api_port: int
    lan_mac: str
    mgmt_mac: str
    token_file: str
    modules_dir: str
    sysctls: tuple[tuple[str, str], ...]
    command_port: int = COMMAND_PORT
    pythonpath: str = field(default_factory=lambda: os.environ.get("PYTHONPATH", ""))
    """The host's PYTHONPATH, given to every command in the guest: the guest runs the same code
    as the lab process (a checkout other than the venv's editable install, e.g. a snapshot)."""


def mac_for(lab: str, node: str, nic: str) -> str:
    """A stable, locally administered unicast MAC per lab, node and NIC."""
    digest = hashlib.sha256(f"{lab}/{node}/{nic}".encode()).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in digest[:4])


def shell_links(lan_if: str, mgmt_if: str) -> list[str]:
    """``ip -batch`` lines that turn a node namespace into the VM's shell: the node's addresses go
    to the guest; ``eth0``/``mgmt`` become bridge ports next to the guest's taps."""
    lines = [f"addr flush dev {lan_if}", f"addr flush dev {mgmt_if}"]
    for tap, bridge, port in ((TAP_LAN, BRIDGE_LAN, lan_if), (TAP_MGMT, BRIDGE_MGMT, mgmt_if)):
        lines += [f"tuntap add dev {tap} mode tap", f"link add name {bridge} type bridge",
                  f"link set dev {port} master {bridge}", f"link set dev {tap} master {bridge}",
                  f"link set dev {tap} up", f"link set dev {bridge} up"]
    return lines


def token_path(private_dir: Path, node: str) -> Path:
    return private_dir / f"vm-{node}.token"


def write_guest_files(private_dir: Path, config: GuestConfig) -> Path:
    """The token (0600) and the config file; returns the config's path."""
    private_dir.mkdir(parents=True, exist_ok=True)
    token = Path(config.token_file)
    token.unlink(missing_ok=True)
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    path = private_dir / f"vm-{config.node}.json"
    path.write_text(json.dumps(asdict(config)))
    return path


def _kept_paths() -> list[str]:
    """The virtualenv and the source tree the guest runs from: the guest's tmpfs over /tmp, /run and
    /var/tmp must not hide them (a CI clone may live under /tmp)."""
    import wirekube

    source = Path(wirekube.__file__).resolve().parents[1]
    kept = [Path(sys.prefix), source]
    if (source.parent / "tests").is_dir():  # a checkout: the tests run scripts of theirs in the guest
        kept.append(source.parent / "tests")
    return list(dict.fromkeys(str(p) for p in kept))


def precompile_sources() -> float:
    """Byte-compile the source trees the guests run (in place, ``__pycache__`` beside the sources),
    returning the seconds it took.  The guests see the host's root read-only and run with
    PYTHONDONTWRITEBYTECODE, so a module without a current .pyc is compiled again by every process
    that imports it, under TCG; the virtualenv's packages and the standard library have theirs
    from installation, an editable checkout (or a PYTHONPATH snapshot) may have none."""
    import compileall

    started = time.monotonic()
    roots = [Path(p) for p in _kept_paths()[1:]]
    roots += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for root in dict.fromkeys(roots):
        if root.is_dir() and os.access(root, os.W_OK):
            compileall.compile_dir(root, quiet=2, workers=1)
    return time.monotonic() - started


def qemu_argv(pieces: GuestPieces, config: GuestConfig, config_path: Path, workdir: Path,
              memory_mib: int = MEMORY_MIB) -> list[str]:
    qemu = _qemu()
    assert qemu is not None
    append = " ".join([
        "console=ttyS0", "panic=-1", "quiet", "loglevel=4", "random.trust_cpu=on",
        f"wk.python={sys.executable}", f"wk.workdir={workdir}", f"wk.config={config_path}",
        f"wk.keep={','.join(_kept_paths())}"])
    return [
        "nice", "-n", str(QEMU_NICE), qemu, "-name", f"wirekube-{config.node}",
        "-accel", "tcg,tb-size=128", "-cpu", "max", "-smp", "1",
        "-m", str(memory_mib), "-nodefaults", "-no-user-config", "-display", "none",
        "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(pieces.kernel), "-initrd", str(pieces.initrd), "-append", append,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={workdir},mount_tag=labwork,security_model=none,multidevs=remap",
        "-netdev", f"tap,id=lan,ifname={TAP_LAN},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=lan,mac={config.lan_mac},romfile=",
        "-netdev", f"tap,id=mgmt,ifname={TAP_MGMT},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=mgmt,mac={config.mgmt_mac},romfile=",
        "-device", "virtio-rng-pci",
    ]


def client_argv(mgmt_netns: str, config: GuestConfig, argv: Sequence[str]) -> list[str]:
    """The host command that runs ``argv`` inside the guest (from the management hub)."""
    address = config.mgmt_address.split("/")[0]
    return ["ip", "netns", "exec", mgmt_netns, sys.executable, "-m", "wirekube.lab.vm", "exec",
            f"{address}:{config.command_port}", config.token_file, "--", *argv]


def wait_ready(mgmt_netns: str, configs: Sequence[GuestConfig], alive: Callable[[str], bool],
               timeout: float = BOOT_TIMEOUT_S, console: Callable[[str], Path] | None = None,
               started: float | None = None) -> dict[str, float]:
    """Wait until every guest's command server runs a command; returns seconds per node, counted
    from ``started`` (a monotonic time: when qemu started; default now), as is the timeout."""
    if started is None:
        started = time.monotonic()
    pending = {c.node: c for c in configs}
    ready: dict[str, float] = {}
    while pending:
        for node, config in list(pending.items()):
            if not alive(node):
                where = f"; see {console(node)}" if console else ""
                raise VMError(f"the VM of node {node} exited while booting{where}")
            done = subprocess.run(client_argv(mgmt_netns, config, ["true"]), capture_output=True, timeout=30,
                                  check=False)
            if done.returncode == 0:
                ready[node] = round(time.monotonic() - started, 2)
                del pending[node]
        if pending and time.monotonic() - started > timeout:
            where = f"; see {', '.join(str(console(n)) for n in pending)}" if console else ""
            raise VMError(f"VMs not ready after {timeout:.0f} s: {', '.join(sorted(pending))}{where}")
        if pending:
            time.sleep(1.0)
    return ready


# ---- the frame protocol ----------------------------------------------------------------------------


def send_frame(sock: socket.socket, kind: bytes, payload: bytes, lock: threading.Lock | None = None) -> None:
    data = _HDR.pack(kind, len(payload)) + payload
    if lock is None:
        sock.sendall(data)
    else:
        with lock:
            sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The next frame, or None at end of stream; ValueError on an oversized frame."""
    head = _recv_exact(sock, _HDR.size)
    if head is None:
        return None
    kind, length = _HDR.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    payload = _recv_exact(sock, length) if length else b""
    if payload is None:
        return None
    return kind, payload


# ---- client (host side) ----------------------------------------------------------------------------


def exec_main(address: str, token_file: str, argv: Sequence[str]) -> int:
    host, _, port = address.rpartition(":")
    try:
        token = Path(token_file).read_text().strip()
        sock = socket.create_connection((host, int(port)), timeout=5)
    except OSError as e:
        print(f"wirekube-vm exec: cannot reach the guest at {address}: {e}", file=sys.stderr)
        return 255
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lock = threading.Lock()
    send_frame(sock, b"h", json.dumps({"token": token, "argv": list(argv)}).encode(), lock)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            send_frame(sock, b"s", str(signum).encode(), lock)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    def pump_stdin() -> None:
        try:
            fd = sys.stdin.fileno()
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                send_frame(sock, b"i", chunk, lock)
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError):
            send_frame(sock, b"e", b"", lock)

    threading.Thread(target=pump_stdin, daemon=True).start()
    while True:
        try:
            frame = recv_frame(sock)
        except (OSError, ValueError) as e:
            print(f"wirekube-vm exec: connection to {address} failed: {e}", file=sys.stderr)
            return 255
        if frame is None:
            print(f"wirekube-vm exec: the guest at {address} closed the connection", file=sys.stderr)
            return 255
        kind, payload = frame
        if kind == b"o":
            sys.stdout.buffer.write(payload)
            sys.stdout.buffer.flush()
        elif kind == b"r":
            sys.stderr.buffer.write(payload)
            sys.stderr.buffer.flush()
        elif kind == b"x":
            code = int(payload)
            return code if code >= 0 else 128 - code


# ---- guest side ------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"wirekube-vm: {message}", flush=True)


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise VMError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _nic_by_mac(mac: str) -> str:
    for dev in Path("/sys/class/net").iterdir():
        with contextlib.suppress(OSError):
            if (dev / "address").read_text().strip().lower() == mac.lower():
                return dev.name
    raise VMError(f"no NIC with MAC {mac}")


def configure_guest(config: GuestConfig) -> None:
    """Modules, sysctls and the node's addresses (what the lab gave the namespace)."""
    for module in GUEST_MODULES:
        done = subprocess.run(["modprobe", "-d", config.modules_dir, module], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            _log(f"modprobe {module}: {done.stderr.strip()}")
    for key, value in config.sysctls:
        with contextlib.suppress(OSError):
            Path("/proc/sys", *key.split(".")).write_text(value)
    _run(["hostname", config.node])
    lan, mgmt = _nic_by_mac(config.lan_mac), _nic_by_mac(config.mgmt_mac)
    for dev, name in ((lan, "eth0"), (mgmt, "mgmt")):
        if dev != name:
            _run(["ip", "link", "set", "dev", dev, "name", name])
    api = config.api_address
    batch = [
        "link set dev lo up",
        f"addr add {config.lan_address} dev eth0", "link set dev eth0 up",
        f"addr add {config.mgmt_address} peer {api}/32 dev mgmt", "link set dev mgmt up",
        f"route add default via {config.gateway} dev eth0",
    ]
    done = subprocess.run(["ip", "-batch", "-"], input="\n".join(batch) + "\n", capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise VMError(f"ip -batch: {done.stderr.strip()}")


class _Command:
    """One connection: run one command, relay its streams, deliver signals."""

    def __init__(self, conn: socket.socket, token: str) -> None:
        self.conn = conn
        self.token = token
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            self._run()
        except (OSError, ValueError) as e:
            _log(f"command connection failed: {e}")
        finally:
            self._close()

    def _close(self) -> None:
        """Half-close, then drain what the client still sends (stdin EOF): closing with unread
        data would reset the connection and could drop the exit frame on the client's side."""
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_WR)
            self.conn.settimeout(2.0)
            while self.conn.recv(65536):
                pass
        with contextlib.suppress(OSError):
            self.conn.close()

    def _run(self) -> None:
        first = recv_frame(self.conn)
        if first is None or first[0] != b"h":
            return
        header = json.loads(first[1])
        if not secrets.compare_digest(str(header.get("token", "")), self.token):
            send_frame(self.conn, b"r", b"wirekube-vm: bad token\n", self.lock)
            send_frame(self.conn, b"x", b"126", self.lock)
            return
        argv = [str(a) for a in header.get("argv", [])]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, cwd="/")
        except OSError as e:
            send_frame(self.conn, b"r", f"wirekube-vm: {argv[0] if argv else '?'}: {e}\n".encode(), self.lock)
            send_frame(self.conn, b"x", b"127", self.lock)
            return
        finished = threading.Event()
        pumps = [threading.Thread(target=self._pump, args=(stream, kind), daemon=True)
                 for stream, kind in ((proc.stdout, b"o"), (proc.stderr, b"r"))]
        for pump in pumps:
            pump.start()
        threading.Thread(target=self._read_client, args=(proc, finished), daemon=True).start()
        code = proc.wait()
        finished.set()
        for pump in pumps:
            pump.join(timeout=2.0)
        with contextlib.suppress(OSError):
            send_frame(self.conn, b"x", str(code).encode(), self.lock)

    def _pump(self, stream: Any, kind: bytes) -> None:
        fd = stream.fileno()
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                send_frame(self.conn, kind, chunk, self.lock)
        except OSError:
            return

    def _read_client(self, proc: subprocess.Popen[bytes], finished: threading.Event) -> None:
        stdin = proc.stdin
        assert stdin is not None
        while True:
            try:
                frame = recv_frame(self.conn)
            except (OSError, ValueError):
                frame = None
            if frame is None:
                if not finished.is_set():  # the client went away: so does the command
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                return
            kind, payload = frame
            if kind == b"i":
                with contextlib.suppress(OSError):
                    stdin.write(payload)
                    stdin.flush()
            elif kind == b"e":
                with contextlib.suppress(OSError):
                    stdin.close()
            elif kind == b"s":
                with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                    os.killpg(proc.pid, int(payload))


def _forward_api(listen_port: int, target: tuple[str, int]) -> None:
    """127.0.0.1:listen_port -> the routed API address, so node kubeconfigs work unchanged."""
    server = socket.create_server(("127.0.0.1", listen_port), reuse_port=False)

    def splice(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def handle(client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        t = threading.Thread(target=splice, args=(upstream, client), daemon=True)
        t.start()
        splice(client, upstream)
        t.join()
        client.close()
        upstream.close()

    while True:
        client, _ = server.accept()
        threading.Thread(target=handle, args=(client,), daemon=True).start()


def guest_main(config_path: str) -> int:
    raw = json.loads(Path(config_path).read_text())
    raw["sysctls"] = tuple(tuple(x) for x in raw["sysctls"])
    config = GuestConfig(**raw)
    started = time.monotonic()
    try:
        configure_guest(config)
    except VMError as e:
        _log(f"cannot configure the guest: {e}")
        return 1
    token = Path(config.token_file).read_text().strip()
    if config.pythonpath:
        os.environ["PYTHONPATH"] = config.pythonpath
    api = (config.api_address, config.api_port)
    threading.Thread(target=_forward_api, args=(API_FORWARD_PORT, api), daemon=True).start()
    address = config.mgmt_address.split("/")[0]
    server = socket.create_server((address, config.command_port))
    _log(f"node {config.node} ready in {time.monotonic() - started:.1f} s (guest side); "
         f"commands on {address}:{config.command_port}")
    # The initramfs shell is PID 1 and reaps orphans; every command here is waited by its Popen.
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_Command(conn, token).run, daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "guest":
        return guest_main(args[1])
    if len(args) >= 4 and args[0] == "exec" and args[3] == "--":
        return exec_main(args[1], args[2], args[4:])
    print("usage: python -m wirekube.lab.vm guest CONFIG | exec HOST:PORT TOKEN_FILE -- ARGV...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())


