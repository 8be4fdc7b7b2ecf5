"""Lab nodes as real Kubernetes nodes (topology ``kubernetes: kubelet``; built-in ``chart``).

Every lab node runs its own containerd and kubelet inside the node's namespaces (network and the
node's private mount namespace), so the chart's hostNetwork agent pods land in the node exactly as
on a real machine; kube-controller-manager and kube-scheduler run beside the API server. The three
images (``make images``, ci/build-images.sh) and the local pause image are imported into each
node's containerd, then WireKube is installed with ``helm install`` as a user does.

Per node (``<workdir>/kubelet/<node>``):
    containerd.toml, containerd.sock, containerd/{root,state}   the node's runtime
    kubelet.yaml, kubelet/ (root dir), cni/ (one bridge network)  the node's kubelet
    var-lib, var-log   bound over /var/lib and /var/log in the node's mount namespace, so the
                       chart's hostPaths (/var/lib/wirekube) and the kubelet's fixed paths
                       (/var/lib/kubelet/device-plugins, /var/log/pods) stay per node

What differs from a cloud cluster (see README "The chart on real kubelet nodes"):
  - no kube-proxy: each node's nftables table ``wklab_svc`` maps the ``kubernetes`` Service
    address to the API server's routed address (the one Service pods use);
  - the kubelets authenticate with the lab's admin certificate (no TLS bootstrap, no Node
    authorizer); the kubelet serving certificate is self-signed, and the API server does not reach
    the kubelets (``kubectl logs`` is not available: the container logs are in var-log/pods);
  - the kubelet sets global sysctls on this host (vm.overcommit_memory=1, kernel.panic=10,
    kernel.panic_on_oops=1); pods run in cgroups directly under the root (cgroupsPerQOS off, so
    several kubelets can share one cgroup v1 hierarchy);
  - the relay is the lab's own relay process(es) on the lab's internet (mesh.relay.provider
    external), not the chart's relay Deployment: the lab has no load-balancer controller yet.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from wirekube import errors, k8s
from wirekube.lab.cluster import REPO_ROOT, SERVICE_CIDR, cache_dir, find_binary
from wirekube.lab.net import Lab, LabError
from wirekube.waiting import wait_for

if TYPE_CHECKING:
    from wirekube.lab.orchestrate import LabHandle
    from wirekube.lab.topology import Topology

CNI_BIN_DIR = Path("/usr/lib/cni")
POD_NET = "10.88.0.0/16"  # node i's pods: 10.88.i.0/24 (bridge + host-local, masqueraded)
SVC_TABLE = "wklab_svc"
NAMESPACE = "wirekube-system"
RELEASE = "wirekube"


class KubeletLabError(errors.WireKubeError):
    pass


# ---- images -------------------------------------------------------------------------------------


def images_env() -> dict[str, str]:
    """What ci/build-images.sh built: ``AGENT_REF``, ``AGENT_DIGEST``, ``..._ARCHIVE``, ``PAUSE_REF``."""
    path = cache_dir() / "images" / "images.env"
    if not path.exists():
        raise KubeletLabError(f"no images built ({path} is missing): run `make images` first")
    env = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    for key in ("AGENT_REF", "RELAY_REF", "GATEWAY_REF", "PAUSE_REF"):
        if key not in env:
            raise KubeletLabError(f"{path} lacks {key}: run `make images` again")
    return env


def _split_ref(ref: str) -> tuple[str, str]:
    repo, _, tag = ref.rpartition(":")
    return repo, tag


# ---- per-node files -------------------------------------------------------------------------------


def node_root(workdir: Path, node: str) -> Path:
    return workdir / "kubelet" / node


def containerd_config(root: Path, pause_ref: str) -> str:
    return f"""version = 2
root = "{root}/containerd/root"
state = "{root}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.grpc.v1.introspection.tracing"]
[grpc]
  address = "{root}/containerd.sock"
[ttrpc]
  address = "{root}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_ref}"
  # root here lacks CAP_SYS_RESOURCE: without this every sandbox fails in runc (nsexec cannot
  # lower oom_score_adj), reported only as "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{root}/cni"
"""


def cni_config(index: int) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0", "name": "wklab",
        "plugins": [
            {"type": "bridge", "bridge": "wklab0", "isGateway": True, "ipMasq": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": f"10.88.{index}.0/24"}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(root: Path, node_ip: str, ca: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        # This host: cgroup v1, cgroupfs, swap allowed; several kubelets share one hierarchy, so
        # no QoS tree of their own (pods' cgroups are named by pod UID).
        "failCgroupV1": False, "cgroupDriver": "cgroupfs", "failSwapOn": False,
        "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
        "containerRuntimeEndpoint": f"unix://{root}/containerd.sock",
        "address": node_ip, "port": 10250, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(ca)}},
        "authorization": {"mode": "Webhook"},
        "volumePluginDir": str(root / "volume-plugins"),
        "resolvConf": "/etc/resolv.conf",
        # The images exist only locally: never garbage-collect them, never evict for the shared disk.
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "serializeImagePulls": False,
        "nodeStatusReportFrequency": "10s",
    }


def svc_nft_rules(api_host: str, api_port: int) -> str:
    """No kube-proxy: the ``kubernetes`` Service's address, to the API server over the node's
    management link, for the node itself (hostNetwork pods) and for its pods on the bridge."""
    import ipaddress

    svc = str(ipaddress.ip_network(SERVICE_CIDR)[1])
    return f"""table ip {SVC_TABLE} {{
  chain pre {{
    type nat hook prerouting priority dstnat;
    ip daddr {svc} tcp dport 443 dnat to {api_host}:{api_port}
  }}
  chain out {{
    type nat hook output priority -100;
    ip daddr {svc} tcp dport 443 dnat to {api_host}:{api_port}
  }}
  chain post {{
    type nat hook postrouting priority srcnat;
    ip saddr {POD_NET} oifname "mgmt" masquerade
  }}
}}
"""


# ---- start ------------------------------------------------------------------------------------------


def start_control_plane_extras(lab: Lab, cluster_dir: Path, admin_kubeconfig: Path) -> None:
    """kube-controller-manager (ServiceAccounts, tokens, DaemonSets, ReplicaSets, GC) and
    kube-scheduler, on the host next to the API server."""
    pki = cluster_dir / "pki"
    lab.spawn_on_host([str(find_binary("kube-controller-manager")), f"--kubeconfig={admin_kubeconfig}",
                       f"--authentication-kubeconfig={admin_kubeconfig}",
                       f"--authorization-kubeconfig={admin_kubeconfig}",
                       f"--service-account-private-key-file={pki / 'sa.key'}",
                       f"--root-ca-file={pki / 'ca.crt'}", "--use-service-account-credentials=true",
                       "--leader-elect=false", "--secure-port=0", "--controllers=*,-nodeipam",
                       "--node-monitor-grace-period=40s", "--v=1"],
                      lab.log_dir / "kube-controller-manager.log")
    lab.spawn_on_host([str(find_binary("kube-scheduler")), f"--kubeconfig={admin_kubeconfig}",
                       f"--authentication-kubeconfig={admin_kubeconfig}",
                       f"--authorization-kubeconfig={admin_kubeconfig}",
                       "--leader-elect=false", "--secure-port=0", "--v=1"],
                      lab.log_dir / "kube-scheduler.log")


def prepare_node(lab: Lab, workdir: Path, node: str, index: int, node_kubeconfig: Path,
                 ca: Path, pause_ref: str) -> Path:
    root = node_root(workdir, node)
    for sub in ("containerd", "cni", "kubelet", "volume-plugins", "var-lib", "var-log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "containerd.toml").write_text(containerd_config(root, pause_ref))
    (root / "cni" / "10-wklab.conflist").write_text(json.dumps(cni_config(index), indent=1))
    info = lab.nodes[node]
    (root / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(root, str(info.lan_ip), ca)))
    # `ip netns exec` gave the node a fresh /sys without the cgroup mounts the kubelet and runc need.
    lab.exec(node, ["sh", "-c", cgroup_mount_script()], check=True)
    # Per-node /var/lib and /var/log inside the node's own mount namespace.
    for src, dst in ((root / "var-lib", "/var/lib"), (root / "var-log", "/var/log")):
        lab.exec(node, ["mount", "--bind", str(src), dst], check=True)
    routed = lab.api_routed_endpoint
    if routed is None:
        raise KubeletLabError("the API server is not forwarded into the lab yet")
    lab.exec(node, ["nft", "-f", "-"], input=svc_nft_rules(str(routed.host), routed.port), check=True)
    lab.exec(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    del node_kubeconfig
    return root


def cgroup_mount_script(mountinfo: str | None = None) -> str:
    """Shell commands that mount this host's cgroup hierarchies (v1 controllers and v2) again
    under /sys/fs/cgroup (the same hierarchies: same options, so the same cgroups)."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    lines = ["mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup"]
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, super_fields = left.split(), right.split()
        if len(fields) < 5 or len(super_fields) < 3 or not fields[4].startswith("/sys/fs/cgroup/"):
            continue
        target, fstype = fields[4], super_fields[0]
        if fstype == "cgroup":
            opts = ",".join(o for o in super_fields[2].split(",") if o not in ("rw", "ro"))
            lines.append(f"mkdir -p {target} && mount -t cgroup -o {opts} cgroup {target}")
        elif fstype == "cgroup2":
            lines.append(f"mkdir -p {target} && mount -t cgroup2 cgroup2 {target}")
    return " && ".join(lines)


def _ctr(root: Path, *args: str) -> list[str]:
    return ["ctr", f"--address={root}/containerd.sock", "-n", "k8s.io", *args]


def start_containerd(lab: Lab, workdir: Path, node: str) -> None:
    root = node_root(workdir, node)
    lab.spawn(node, ["containerd", f"--config={root / 'containerd.toml'}"], lab.log_dir / f"containerd-{node}.log")

    def ready() -> bool:
        return lab.exec(node, _ctr(root, "version"), check=False, timeout=10).returncode == 0
    wait_for(ready, timeout=60, interval=0.3, what=f"containerd of {node} to answer")


def import_images(lab: Lab, workdir: Path, node: str, archives: Iterable[str]) -> None:
    root = node_root(workdir, node)
    for archive in archives:
        lab.exec(node, _ctr(root, "images", "import", archive),
                 check=True, timeout=600)


def start_kubelet(lab: Lab, workdir: Path, node: str, node_kubeconfig: Path, labels: Mapping[str, str]) -> None:
    root = node_root(workdir, node)
    info = lab.nodes[node]
    argv = [str(find_binary("kubelet")), f"--config={root / 'kubelet.yaml'}", f"--kubeconfig={node_kubeconfig}",
            f"--root-dir={root / 'kubelet'}", f"--cert-dir={root / 'kubelet' / 'pki'}",
            f"--hostname-override={node}", f"--node-ip={info.lan_ip}",
            "--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())), "--v=1"]
    lab.spawn(node, argv, lab.log_dir / f"kubelet-{node}.log")


def wait_nodes_ready(kube: k8s.Kube, names: Iterable[str], timeout: float) -> None:
    wanted = set(names)

    def ready() -> bool:
        items, _ = kube.list(k8s.NODES)
        ok = {n["metadata"]["name"] for n in items
              if any(c.get("type") == "Ready" and c.get("status") == "True"
                     for c in n.get("status", {}).get("conditions", []))}
        return wanted <= ok
    wait_for(ready, timeout=timeout, interval=0.5, what=f"kubelet nodes {sorted(wanted)} to be Ready")


# ---- the chart ------------------------------------------------------------------------------------


def lab_values(lab: Lab, images: Mapping[str, str]) -> dict[str, Any]:
    """The values a user of this lab would write: local images, the API server reachable at the
    node's loopback proxy, the lab's relay and STUN servers on its internet."""
    def image(key: str) -> dict[str, str]:
        repo, tag = _split_ref(images[f"{key}_REF"])
        return {"repository": repo, "tag": tag, "pullPolicy": "Never"}

    return {
        "mesh": {
            "engine": "userspace",
            "stunServers": [str(s) for s in lab.stun],
            "relay": {"mode": "auto", "provider": "external", "external": {"endpoint": str(lab.relay)},
                      "handshakeTimeoutSeconds": 20, "directRetryIntervalSeconds": 30},
        },
        "agent": {"image": image("AGENT"), "apiServer": {"host": "127.0.0.1", "port": 6443},
                  "logFormat": "text", "extraArgs": ["--no-imds", "--resync-seconds=10"]},
        "relay": {"enabled": False},
        "controller": {"image": image("GATEWAY"), "replicas": 1},
    }


def helm(admin_kubeconfig: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    helm_bin = shutil.which("helm") or str(cache_dir() / "tools" / "helm")
    return subprocess.run([helm_bin, f"--kubeconfig={admin_kubeconfig}", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def helm_install(admin_kubeconfig: Path, values_path: Path, timeout: str = "300s") -> None:
    proc = helm(admin_kubeconfig, "install", RELEASE, str(REPO_ROOT / "charts" / "wirekube"), "-n", NAMESPACE,
                "--create-namespace", "-f", str(values_path), "--wait", f"--timeout={timeout}")
    if proc.returncode != 0:
        raise KubeletLabError(f"helm install failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")


# ---- teardown and measurement ----------------------------------------------------------------------


def teardown(lab: Lab, workdir: Path) -> None:
    """Kill every container of every node (their shims outlive containerd), then the daemons are
    ended by the lab like every other recorded process."""
    base = workdir / "kubelet"
    if not base.exists():
        return
    # The kubelets first: a running kubelet restarts every container killed below.
    for record in _records(lab):
        if any(Path(a).name == "kubelet" or Path(a).name.startswith("kubelet-v") for a in record["argv"]):
            try:
                lab.stop(int(record["pid"]), grace=5.0)
            except LabError:
                pass
    for root in sorted(p for p in base.iterdir() if p.is_dir()):
        node = root.name
        if node in lab.nodes and (root / "containerd.sock").exists():
            tasks = lab.exec(node, _ctr(root, "tasks", "ls", "-q"), check=False, timeout=20)
            for task in tasks.stdout.split():
                lab.exec(node, _ctr(root, "tasks", "kill", "-a", "-s", "SIGKILL", task), check=False, timeout=10)
        # Shims left behind (they outlive containerd): those serving this node's socket.
        for pid in node_shims(root):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def node_shims(root: Path) -> list[int]:
    """PIDs of the containerd shims serving this node's containerd (its socket path is unique to
    this lab and node; containerd 1.6 keeps no shim PID file)."""
    needle = f"-address\0{root}/containerd.sock\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"/usr/bin/containerd-shim") and needle in cmdline:
            found.append(int(proc.name))
    return found


def _records(lab: Lab) -> list[dict[str, Any]]:
    return list((lab._state.read() or {}).get("processes", []))


def node_usage(lab: Lab, workdir: Path) -> dict[str, dict[str, float]]:
    """RSS (MB) and CPU seconds so far of each node's kubelet, containerd and shims."""
    out: dict[str, dict[str, float]] = {}
    for node in lab.nodes:
        pids: list[int] = []
        for r in _records(lab):
            if r.get("target") == node and any(Path(a).name.startswith(("kubelet", "containerd")) for a in r["argv"]):
                pids.extend(_descendants(int(r["pid"])))
        pids.extend(node_shims(node_root(workdir, node)))
        rss = cpu = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in set(pids):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm not in ("kubelet", "containerd", "containerd-shim", "containerd-shim-runc-v2"):
                continue
            rss += int(stat[21]) * os.sysconf("SC_PAGE_SIZE") / 1e6
            cpu += (int(stat[11]) + int(stat[12])) / tick
        out[node] = {"rss_mb": round(rss, 1), "cpu_s": round(cpu, 1)}
    return out


def _descendants(pid: int) -> list[int]:
    found = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        found.extend(_descendants(int(child)))
    return found


def up_nodes(lab: Lab, kube: k8s.Kube, workdir: Path, cluster_dir: Path, admin_kubeconfig: Path,
             node_kubeconfig: Path, timeout: float = 180.0) -> dict[str, str]:
    """Everything between a running API server and ``helm install``; returns images_env()."""
    images = images_env()
    # The relay image is not imported: the lab's relay is its own process (module docstring).
    archives = [images[k] for k in ("PAUSE_ARCHIVE", "AGENT_ARCHIVE", "GATEWAY_ARCHIVE")]
    for a in archives:
        if not Path(a).exists():
            raise KubeletLabError(f"image archive {a} is missing: run `make images`")
    start_control_plane_extras(lab, cluster_dir, admin_kubeconfig)
    ca = cluster_dir / "pki" / "ca.crt"
    for index, node in enumerate(lab.nodes, start=1):
        prepare_node(lab, workdir, node, index, node_kubeconfig, ca, images["PAUSE_REF"])
        start_containerd(lab, workdir, node)
    with concurrent.futures.ThreadPoolExecutor(len(lab.nodes)) as pool:  # ~1 min per node and image when loaded
        list(pool.map(lambda node: import_images(lab, workdir, node, archives), lab.nodes))
    for node, info in lab.nodes.items():
        labels = {"wirekube.io/lab-site": info.site,
                  "eks.amazonaws.com/compute-type": "ec2" if info.nat.value == "none" else "hybrid"}
        start_kubelet(lab, workdir, node, node_kubeconfig, labels)
    started = time.monotonic()
    wait_nodes_ready(kube, lab.nodes, timeout=timeout - (time.monotonic() - started))
    return images


# ---- the whole lab in this mode ----------------------------------------------------------------------


def up(topology: Topology, name: str, *, wait: float = 240.0) -> LabHandle:
    """``wirekube-lab up chart``: network, control plane (+ controller-manager, scheduler), the
    lab's relay and STUN servers, a containerd + kubelet per node, then ``helm install``; waits
    for every pair to pass traffic on its predicted transport. Returns the orchestrator's handle."""
    from wirekube.lab import orchestrate as o
    from wirekube.lab.cluster import ControlPlane, write_kubeconfig
    from wirekube.progress import step

    o.down(name)
    h = o._handle(name)
    steps = 6
    step("lab", 1, steps, "building the network (namespaces, NAT routers, management path)")
    lab = Lab(topology, name=name)
    lab.up()
    try:
        step("lab", 2, steps, "starting etcd + kube-apiserver (CRDs come from helm)")
        cp = ControlPlane(h.cluster_dir, extra_sans=[str(lab.api_address)])
        cp.up(install_crds=False)
        assert cp.state is not None
        lab.forward_api(("127.0.0.1", cp.state.apiserver_port))
        write_kubeconfig(h.node_kubeconfig, "https://127.0.0.1:6443", cp.pki)
        (h.workdir / o.STATE).write_text(json.dumps({"cluster": str(h.cluster_dir), "kubernetes": "kubelet"}))
        kube = k8s.Kube.from_kubeconfig(cp.kubeconfig)
        step("lab", 3, steps, f"starting the relay on {lab.relay} and STUN on {', '.join(map(str, lab.stun))}")
        o._start_relays(lab)
        step("lab", 4, steps,
             f"kube-controller-manager, kube-scheduler; containerd + kubelet on {len(lab.nodes)} nodes")
        t0 = time.monotonic()
        images = up_nodes(lab, kube, h.workdir, h.cluster_dir, h.admin_kubeconfig, h.node_kubeconfig)
        nodes_ready = time.monotonic() - t0
        step("lab", 5, steps,
             "helm install wirekube charts/wirekube -n wirekube-system --create-namespace -f values.yaml")
        values = h.workdir / "values.yaml"
        values.write_text(yaml.safe_dump(lab_values(lab, images), sort_keys=False))
        t1 = time.monotonic()
        helm_install(h.admin_kubeconfig, values)
        step("lab", 6, steps, f"waiting up to {wait:.0f}s for every pair that can work to pass traffic")
        converged = o.wait_converged(lab, kube, timeout=wait)
        kube.close()
        (h.workdir / o.STATE).write_text(json.dumps({
            "cluster": str(h.cluster_dir), "kubernetes": "kubelet", "converged": converged,
            "nodes_ready_seconds": round(nodes_ready, 1),
            "convergence_seconds": round(time.monotonic() - t1, 1) if converged else None,
            "usage": node_usage(lab, h.workdir)}))
        if not converged:
            print("lab: not every expected pair converged in time; see `wirekube-lab status`", flush=True)
    except BaseException:
        o.down(name)
        raise
    return h


def down_hook(name: str, workdir: Path) -> None:
    """Before the lab's processes are ended: kill the containers (their shims outlive containerd)."""
    if not (workdir / "kubelet").exists():
        return
    try:
        lab = Lab.attach(name)
    except Exception:  # noqa: BLE001 - a half-built lab: nothing to enter any more
        return
    teardown(lab, workdir)


def remove_files(workdir: Path) -> None:
    shutil.rmtree(workdir / "kubelet", ignore_errors=True)
    (workdir / "values.yaml").unlink(missing_ok=True)
