"""A real Kubernetes control plane (etcd + kube-apiserver) on this machine, for the lab and tests.

The binaries are the genuine ones, built from the Go module proxy by
``ci/build-control-plane.sh`` into ``~/.cache/wirekube/bin`` (``$WIREKUBE_CACHE/bin``).  This
module generates a throw-away PKI, starts etcd and kube-apiserver bound to one address (loopback
by default, or the lab's management address), installs WireKube's CRDs from
``charts/wirekube/crds``, and writes an admin kubeconfig.  Its state (PIDs, ports) lives in a
state file in the work directory, so ``down`` from another process finds and ends exactly the
processes ``up`` started, by PID.

No controller-manager runs: there is no garbage collector, no namespace controller and no
service-account token controller.  Tests that need those behaviours create the objects
themselves (e.g. ServiceAccounts).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from wirekube.progress import step

REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_DIR = REPO_ROOT / "charts" / "wirekube" / "crds"
SERVICE_CIDR = "10.96.0.0/16"
STATE_FILE = "cluster.json"


class ControlPlaneError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("WIREKUBE_CACHE", Path.home() / ".cache" / "wirekube"))


def find_binary(name: str) -> Path:
    """A control-plane binary from the cache (or PATH), with a clear error when it is missing."""
    cached = cache_dir() / "bin" / name
    if cached.exists():
        return cached
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ControlPlaneError(
        f"{name} not found in {cached.parent} or PATH; build it with `make setup` "
        f"(ci/build-control-plane.sh builds kube-apiserver and etcd from the Go module proxy)"
    )


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------------------------


def _write_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    sans: Iterable[x509.GeneralName] = (),
    usages: Iterable[x509.ObjectIdentifier] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    sans = list(sans)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    usages = list(usages)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(pki: Path, server_ips: Iterable[str]) -> None:
    """CA, API server serving cert, admin client cert (system:masters), service-account keys."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wirekube-lab-ca")])
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    _write_key(pki / "ca.key", ca_key)
    _write_cert(pki / "ca.crt", ca)

    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
    ]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(set(server_ips) | {"127.0.0.1"})]
    sans.append(x509.IPAddress(ipaddress.ip_network(SERVICE_CIDR)[1]))
    server = _cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        server_key,
        ca_name,
        ca_key,
        sans=sans,
        usages=[x509.oid.ExtendedKeyUsageOID.SERVER_AUTH],
    )
    _write_key(pki / "apiserver.key", server_key)
    _write_cert(pki / "apiserver.crt", server)

    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = _cert(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "wirekube-lab-admin"),
            ]
        ),
        admin_key,
        ca_name,
        ca_key,
        usages=[x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    _write_key(pki / "admin.key", admin_key)
    _write_cert(pki / "admin.crt", admin)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def write_kubeconfig(path: Path, server: str, pki: Path, *, user: str = "admin", token: str | None = None) -> None:
    user_entry: dict[str, str]
    if token is not None:
        user_entry = {"token": token}
    else:
        user_entry = {
            "client-certificate": str(pki / "admin.crt"),
            "client-key": str(pki / "admin.key"),
        }
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "wirekube-lab",
                      "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": "wirekube-lab", "context": {"cluster": "wirekube-lab", "user": user}}],
        "current-context": "wirekube-lab",
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


@dataclass
class ClusterState:
    workdir: str
    bind_address: str
    etcd_client_port: int
    etcd_peer_port: int
    apiserver_port: int
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://{self.bind_address}:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> str:
        return str(Path(self.workdir) / "kubeconfig")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_pid(pid: int, expect_in_cmdline: str, timeout: float = 10.0) -> None:
    """End a process we started, by PID: SIGTERM, then SIGKILL after ``timeout``.

    ``expect_in_cmdline`` guards against PID reuse: a PID now owned by something else is left
    alone.
    """
    if not _pid_alive(pid) or expect_in_cmdline not in _cmdline(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)


class ControlPlane:
    """etcd + kube-apiserver in ``workdir``, bound to ``bind_address``."""

    def __init__(self, workdir: str | Path, bind_address: str = "127.0.0.1", extra_sans: Iterable[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.bind_address = bind_address
        self.extra_sans = tuple(extra_sans)
        self.state: ClusterState | None = None

    # ---- persistence ---------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.workdir / STATE_FILE

    def _save(self) -> None:
        assert self.state is not None
        self.state_path.write_text(json.dumps(asdict(self.state), indent=2))

    @classmethod
    def load(cls, workdir: str | Path) -> ControlPlane:
        cp = cls(workdir)
        data = json.loads(cp.state_path.read_text())
        cp.state = ClusterState(**data)
        cp.bind_address = cp.state.bind_address
        return cp

    @property
    def kubeconfig(self) -> str:
        assert self.state is not None
        return self.state.kubeconfig

    @property
    def server(self) -> str:
        assert self.state is not None
        return self.state.server

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def logdir(self) -> Path:
        return self.workdir / "logs"

    # ---- lifecycle -----------------------------------------------------------------------------

    def up(self, *, install_crds: bool = True, timeout: float = 120.0) -> ControlPlane:
        if self.state_path.exists():
            ControlPlane.load(self.workdir).down()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logdir.mkdir(exist_ok=True)
        host = self.bind_address
        self.state = ClusterState(
            workdir=str(self.workdir),
            bind_address=host,
            etcd_client_port=free_port(host),
            etcd_peer_port=free_port(host),
            apiserver_port=free_port(host),
        )
        self._save()
        try:
            step("cluster", 1, 4, "generating certificates")
            make_pki(self.pki, [host, *self.extra_sans])
            write_kubeconfig(Path(self.state.kubeconfig), self.state.server, self.pki)
            step("cluster", 2, 4, f"starting etcd on {host}:{self.state.etcd_client_port}")
            self.start_etcd()
            step("cluster", 3, 4, f"starting kube-apiserver on {self.state.server}")
            self.start_apiserver()
            self.wait_ready(timeout)
            if install_crds:
                step("cluster", 4, 4, f"installing CRDs from {CRD_DIR}")
                self.install_crds(CRD_DIR.glob("*.yaml"))
        except BaseException:
            self.down()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> int:
        assert self.state is not None
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        self.state.pids[name] = proc.pid
        self._save()
        return proc.pid

    def start_etcd(self) -> None:
        assert self.state is not None
        s, host = self.state, self.bind_address
        self._spawn(
            "etcd",
            [
                str(find_binary("etcd")),
                "--name=wirekube-lab",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://{host}:{s.etcd_client_port}",
                f"--advertise-client-urls=http://{host}:{s.etcd_client_port}",
                f"--listen-peer-urls=http://{host}:{s.etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://{host}:{s.etcd_peer_port}",
                f"--initial-cluster=wirekube-lab=http://{host}:{s.etcd_peer_port}",
                "--listen-metrics-urls=",
                "--log-level=warn",
                "--quota-backend-bytes=2147483648",
                "--unsafe-no-fsync",
            ],
        )

    def start_apiserver(self) -> None:
        assert self.state is not None
        s, pki = self.state, self.pki
        self._spawn(
            "kube-apiserver",
            [
                str(find_binary("kube-apiserver")),
                f"--bind-address={self.bind_address}",
                f"--advertise-address={self.bind_address}",
                f"--secure-port={s.apiserver_port}",
                f"--etcd-servers=http://{self.bind_address}:{s.etcd_client_port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--api-audiences=https://kubernetes.default.svc",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--watch-cache=true",
                "--v=1",
            ],
        )

    def stop_apiserver(self) -> None:
        """Stop only the API server (etcd keeps the data), e.g. to test an API outage."""
        assert self.state is not None
        pid = self.state.pids.pop("kube-apiserver", None)
        if pid:
            stop_pid(pid, "kube-apiserver")
        self._save()

    def restart_apiserver(self, timeout: float = 120.0) -> None:
        self.stop_apiserver()
        self.start_apiserver()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll /readyz with the admin certificate until it answers ok."""
        import ssl
        import urllib.request

        assert self.state is not None
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            pid = self.state.pids.get("kube-apiserver")
            if pid and not _pid_alive(pid):
                raise ControlPlaneError(
                    f"kube-apiserver exited during start-up; see {self.logdir / 'kube-apiserver.log'}:\n"
                    + _tail(self.logdir / "kube-apiserver.log")
                )
            try:
                with urllib.request.urlopen(f"{self.state.server}/readyz", context=ctx, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError as e:
                last = str(e)
            time.sleep(0.25)
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f}s ({last})")

    def install_crds(self, paths: Iterable[Path], timeout: float = 60.0) -> list[str]:
        """Apply CRD manifests and wait until each is Established."""
        from wirekube import k8s

        kube = k8s.Kube.from_kubeconfig(self.kubeconfig)
        names = []
        try:
            for path in sorted(paths):
                for doc in yaml.safe_load_all(Path(path).read_text()):
                    if not doc:
                        continue
                    kube.apply(k8s.CRDS, doc)
                    names.append(doc["metadata"]["name"])
            deadline = time.monotonic() + timeout
            for name in names:
                while True:
                    crd = kube.get(k8s.CRDS, name)
                    conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
                    if conds.get("Established") == "True":
                        break
                    if time.monotonic() > deadline:
                        raise ControlPlaneError(f"CRD {name} not Established after {timeout:.0f}s: {conds}")
                    time.sleep(0.1)
        finally:
            kube.close()
        return names

    def down(self) -> None:
        """End every process ``up`` started (by PID) and remove the work directory."""
        if self.state is not None:
            for name in ("kube-apiserver", "etcd"):
                pid = self.state.pids.get(name)
                if pid:
                    stop_pid(pid, name)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.state = None

    def processes(self) -> dict[str, int]:
        assert self.state is not None
        return {n: p for n, p in self.state.pids.items() if _pid_alive(p)}


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
