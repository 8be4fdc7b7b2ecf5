"""Watch fan-out at N nodes against the real API server: what every agent's watch costs (issue 20).

Used by ``bench/scale_bench.py`` (``make bench-scale``), part ``watch``. For each layout and each N:

* N synthetic nodes whose objects have the real shape (the agent's ``own_status`` +
  ``Traversal.decorate`` fields, written with ``replace_status`` like the agent writes them, so
  the API server's managedFields are there too): each node's peer transports to all N-1 others
  (40 % relayed, with the nat matrix's reason strings), observed endpoints of the STUN-less 10 %
  of nodes, birthday rounds between symmetric nodes (20 %, at most 64 per node), a path MTU for
  5 % of direct peers, host endpoints, the RoutesGranted condition.
* W real watch connections (agents: every WireKubePeer; with the split layout also the pair
  signals addressed to that agent) plus one reader of the per-node reports (the controller /
  ``wirekubectl``), in a separate process that counts the bytes each connection delivers and when
  each event arrived.
* One status change (one node's transport to one peer flips direct -> relay), one change of a
  per-node fact (a node's NAT port step), and a sample of a convergence wave (every node rewrites
  its transports 3 times, as in a relay outage and recovery, and re-sends its pair coordination
  once); bytes per watcher per write are measured and the whole wave (N nodes, N watching agents)
  is computed from them.
* API server CPU seconds (utime+stime from /proc) and RSS per phase, etcd's db size, watch
  latency (write start -> event read by the watcher).

Layouts:

* ``v1alpha1`` (today's): everything on WireKubePeer.status.
* ``split`` (issue 20): WireKubePeer.status keeps only per-node facts (connected, natType,
  discovery method, host endpoints, udpBlocked, engine, conditions); the per-pair observations a
  node makes (transportMode, peerTransports, relayReasons, pathMTU, lastHandshake) go to its own
  WireKubeNodeReport, which no agent watches; per-pair coordination (an observed endpoint, a
  birthday round) goes to a WireKubePairSignal ``<from>.<to>`` labelled ``wirekube.io/to=<to>``, which
  only ``<to>`` watches (label selector). Observed endpoints come only from the subject's
  witnesses (``wirekube.models.is_witness``, ~24 per subject; reflection needs agreement, not every
  peer's vote).

``lean`` (used for N = 5,000 on this 2-core machine): only the sampled nodes get a report and send
signals; everything agents watch (every WireKubePeer, every signal to a watching agent's node
that a sampled node sends) is complete, so the per-watcher bytes are the real ones, but etcd size
and API server memory then leave out ~N reports nobody watches (flagged in the row).
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

from wirekube import ipam, k8s
from wirekube.lab.cluster import ControlPlane

SIGNALS = k8s.Resource("wirekube.io", "v1alpha1", "wirekubepairsignals", "WireKubePairSignal")
REPORTS = k8s.Resource("wirekube.io", "v1alpha1", "wirekubenodereports", "WireKubeNodeReport")
RELAYED, SYMMETRIC, STUNLESS, PMTU = 0.40, 0.20, 0.10, 0.05
REFLECTION_WITNESSES = 24  # wirekube.models.REFLECTION_WITNESSES (the bench also runs against main without it)
MAX_BIRTHDAY_ROUNDS = 64
WAVE_WRITES_PER_NODE = 3
REASONS = ("peer symmetric and local port-restricted-cone", "udp blocked (peer)", "udp blocked (local)",
           "direct path failed: no answer to direct probes for 10s", "peer symmetric and local symmetric")


def _frac(*parts: object) -> float:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=4).digest()) / 2**32


def name(i: int) -> str:
    return f"node-{i:05d}"


def is_symmetric(i: int) -> bool:
    return _frac("sym", i) < SYMMETRIC


def is_stunless(i: int) -> bool:
    return not is_symmetric(i) and _frac("stunless", i) < STUNLESS / (1 - SYMMETRIC)


def relayed(i: int, j: int) -> bool:
    a, b = min(i, j), max(i, j)
    return _frac("relay", a, b) < RELAYED


def is_witness(subject: str, observer: str, peers: int) -> bool:
    try:
        from wirekube.models import is_witness as rule
    except ImportError:  # main before the layout change: the same rule
        if peers <= REFLECTION_WITNESSES:
            return True
        digest = hashlib.blake2b(f"{subject}\0{observer}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < (REFLECTION_WITNESSES / peers) * 2**64
    return rule(subject, observer, peers)


def observers(j: int, n: int, split: bool) -> list[int]:
    """Who reports the STUN-less subject j: every direct peer (v1alpha1), its witnesses among them (split)."""
    return [k for k in range(n) if k != j and not relayed(j, k) and (not split or is_witness(name(j), name(k), n))]


def birthday_peers(i: int, n: int) -> list[int]:
    if not is_symmetric(i):
        return []
    return [j for j in range(n) if j != i and is_symmetric(j)][:MAX_BIRTHDAY_ROUNDS]


def _round(i: int, j: int, version: int) -> dict[str, Any]:
    return {"round": 1 + version, "notBefore": f"2026-12-07T16:{version % 60:02d}:05.000Z",
            "portMin": 20000 + (i * 7 + j) % 20000, "portMax": 20000 + (i * 7 + j) % 20000 + 511}


def spec(i: int) -> dict[str, Any]:
    import base64

    key = base64.b64encode(hashlib.sha256(f"key{i}".encode()).digest()).decode()
    key = key[:42] + "A="  # a valid X25519 public key's padding shape (the CRD's pattern)
    return {"publicKey": key, "endpoint": f"198.51.{i // 250}.{i % 250 + 1}:51820",
            "allowedIPs": [f"{ipam.mesh_ip(name(i), '10.255.0.0/16')}/32"], "persistentKeepalive": 25}


def facts(i: int, version: int) -> dict[str, Any]:
    """The per-node facts every agent needs from a peer (what stays on WireKubePeer.status)."""
    return {"connected": True, "natType": "symmetric" if is_symmetric(i) else "port-restricted-cone",
            "endpointDiscoveryMethod": "stun" if not is_stunless(i) else "imds",
            "natPortStep": 0, "hostEndpoints": [f"10.{i // 250}.{i % 250}.10:51820"], "udpBlocked": False,
            "engine": "userspace (no wireguard kernel module)",
            "conditions": [{"type": "RoutesGranted", "status": "True", "reason": "AllGranted",
                            "message": "every AllowedIPs entry is granted",
                            "lastTransitionTime": "2026-12-07T15:00:00Z", "observedGeneration": 1}],
            **({"lastHandshake": f"2026-12-07T16:00:{version % 60:02d}Z"} if version >= 0 else {})}


def pair_observations(i: int, n: int, version: int, flip: int | None = None) -> dict[str, Any]:
    """Node i's per-pair observations: transports, relay reasons, path MTUs."""
    transports, reasons, pmtu = {}, {}, {}
    for j in range(n):
        if j == i:
            continue
        relay = relayed(i, j) != (j == flip)
        transports[name(j)] = "relay" if relay else "direct"
        if relay:
            reasons[name(j)] = REASONS[int(_frac("why", min(i, j), max(i, j)) * len(REASONS))]
        elif _frac("pmtu", i, j) < PMTU:
            pmtu[name(j)] = 1360 + 16 * (version % 4)
    return {"peerTransports": transports, "relayReasons": reasons, "pathMTU": pmtu}


def v1_status(i: int, n: int, version: int, stunless_observed: dict[int, list[int]],
              flip: int | None = None) -> dict[str, Any]:
    status = facts(i, version)
    status["transportMode"] = "mixed"
    status.update(pair_observations(i, n, version, flip))
    status["observedEndpoints"] = {name(j): f"203.0.{j // 250}.{j % 250 + 1}:{40000 + j % 20000}"
                                   for j in stunless_observed.get(i, [])}
    status["birthday"] = {name(j): _round(i, j, version) for j in birthday_peers(i, n)}
    return status


def split_report(i: int, n: int, version: int, flip: int | None = None) -> dict[str, Any]:
    return {"transportMode": "mixed", "lastHandshake": f"2026-12-07T16:00:{version % 60:02d}Z",
            **pair_observations(i, n, version, flip)}


def signal_body(i: int, j: int, version: int, observed: bool, birthday: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if observed:
        body["observedEndpoint"] = f"203.0.{j // 250}.{j % 250 + 1}:{40000 + j % 20000}"
    if birthday:
        body["birthday"] = _round(i, j, version)
    return {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePairSignal",
            "metadata": {"name": f"{name(i)}.{name(j)}",
                         "labels": {"wirekube.io/from": name(i), "wirekube.io/to": name(j)}},
            "spec": body}


def _bench_crd(res: k8s.Resource, kind: str, status: bool) -> dict[str, Any]:
    version: dict[str, Any] = {"name": "v1alpha1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                                              "x-kubernetes-preserve-unknown-fields": True}}}
    if status:
        version["subresources"] = {"status": {}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{res.plural}.wirekube.io"},
            "spec": {"group": "wirekube.io", "scope": "Cluster", "versions": [version],
                     "names": {"kind": kind, "plural": res.plural, "singular": kind.lower(),
                               "listKind": kind + "List"}}}


WATCHERS = textwrap.dedent(r"""
    import http.client, json, re, ssl, sys, threading, time
    server, pki, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    host, port = server.split("//")[1].split(":")
    ctx = ssl.create_default_context(cafile=pki + "/ca.crt")
    ctx.load_cert_chain(pki + "/admin.crt", pki + "/admin.key")
    RV = re.compile(rb'"name":"([^"]+)","resourceVersion":"(\d+)"')  # Go writes the keys sorted
    lock = threading.Lock()
    counts = {}   # stream -> bytes
    events = {}   # stream -> [(name, rv, bytes, t)]
    opened = threading.Semaphore(0)
    decode = spec.get("decode")
    if decode:
        from wirekube import models
    cpu = {"s": 0.0}
    def watch(stream, path, rv, selector):
        q = f"{path}?watch=true&resourceVersion={rv}&allowWatchBookmarks=false&timeoutSeconds=3600"
        if selector:
            q += "&labelSelector=" + selector
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=3700)
        conn.request("GET", q, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, (resp.status, resp.read()[:300])
        opened.release()
        while True:
            line = resp.readline()
            if not line:
                return
            t = time.monotonic()
            m = RV.search(line)
            if decode and stream.startswith(decode):
                c0 = time.thread_time()
                obj = json.loads(line)["object"]
                if "wirekubepeers" in path:
                    models.peer_from_cr(obj)
                cpu["s"] += time.thread_time() - c0
            with lock:
                counts[stream] = counts.get(stream, 0) + len(line)
                events.setdefault(stream, []).append((m.group(1).decode() if m else "?", int(m.group(2)) if m else 0,
                                                      len(line), t))
    for w in spec["streams"]:
        threading.Thread(target=watch, args=(w["stream"], w["path"], w["rv"], w.get("selector")), daemon=True).start()
    for _ in spec["streams"]:
        opened.acquire()
    print(json.dumps({"open": len(spec["streams"])}), flush=True)
    for cmd in sys.stdin:
        with lock:
            if cmd.strip() == "reset":
                counts.clear(); events.clear(); cpu["s"] = 0.0
                print("{}", flush=True)
            else:
                print(json.dumps({"counts": counts, "events": events, "decode_cpu_s": cpu["s"]}), flush=True)
""")


class Watchers:
    def __init__(self, cp: ControlPlane, streams: list[dict[str, Any]], decode: str) -> None:
        spec_ = {"streams": streams, "decode": decode}
        self.proc = subprocess.Popen([sys.executable, "-c", WATCHERS, cp.server, str(cp.pki), json.dumps(spec_)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin and self.proc.stdout
        line = self.proc.stdout.readline()
        assert json.loads(line) == {"open": len(streams)}, line

    def _ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._ask("reset")

    def report(self) -> dict[str, Any]:
        return self._ask("report")

    def wait_for(self, stream: str, obj: str, rv: int, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = self.report()
            if any(e[0] == obj and e[1] >= rv for e in r["events"].get(stream, [])):
                return r
            if time.monotonic() > deadline:
                raise TimeoutError(f"{stream} did not see {obj}@{rv} within {timeout}s")
            time.sleep(0.05)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(10)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _etcd_mb(cp: ControlPlane) -> dict[str, float]:
    assert cp.state is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{cp.state.etcd_client_port}/metrics", timeout=10).read().decode()
    out = {}
    for key, metric in (("etcd_db_mb", "etcd_mvcc_db_total_size_in_bytes"),
                        ("etcd_db_in_use_mb", "etcd_mvcc_db_total_size_in_use_in_bytes")):
        m = re.search(rf"^{metric} (\S+)$", text, re.M)
        out[key] = round(float(m.group(1)) / 2**20, 1) if m else -1.0
    return out


RETRY_PAUSES_S = (1, 2, 4, 8, 15, 30, 60)
"""Pauses between tries of one write when the API server is overloaded (about 2 minutes in all)."""
MEMORY_FLOOR_MB = 3072
"""The run stops (one clear error) when the machine's available memory falls below this: the
machine is shared, and a control plane that outgrows it must not take others' processes with it."""


class MemoryFloor(RuntimeError):
    pass


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Monitor:
    """Samples the API server's and etcd's RSS, the machine's available memory and the load
    average every 2 s while a run lasts; prints a line every 30 s; trips below the memory floor."""

    def __init__(self, label: str, pids: dict[str, int], floor_mb: float = MEMORY_FLOOR_MB) -> None:
        import threading

        self.label, self.pids, self.floor_mb = label, pids, floor_mb
        self.peak = {k: 0.0 for k in pids}
        self.mem_min = float("inf")
        self.loads: list[float] = []
        self.tripped = ""
        self.started = time.monotonic()
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Monitor:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        for k, pid in self.pids.items():
            try:
                self.peak[k] = max(self.peak[k], _rss_mb(pid))
            except OSError:
                pass
        mem = _mem_available_mb()
        self.mem_min = min(self.mem_min, mem)
        self.loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
        if mem < self.floor_mb and not self.tripped:
            self.tripped = (f"available memory {mem:.0f} MB fell below the bench's floor of {self.floor_mb:.0f} MB "
                            f"during {self.phase} (RSS MB: {self.line()})")

    def line(self) -> str:
        rss = ", ".join(f"{k} {v:.0f}" for k, v in self.peak.items())
        return (f"{self.phase}, {time.monotonic() - self.started:.0f} s: peak RSS MB {rss}; "
                f"available {self.mem_min:.0f} MB at least; load {self.loads[-1] if self.loads else 0:.1f}")

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(2.0):
            self.sample()
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                print(f"watch {self.label}: {self.line()}", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.tripped:
            raise MemoryFloor(self.tripped)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.sample()
        return {"seconds": round(time.monotonic() - self.started, 1),
                **{f"{k.replace('kube-', '')}_rss_mb_peak": round(v, 1) for k, v in self.peak.items()},
                "mem_available_mb_min": round(self.mem_min), "load_1m_min": min(self.loads),
                "load_1m_max": max(self.loads), "load_1m_mean": round(statistics.mean(self.loads), 1)}


class Bench:
    def __init__(self, cp: ControlPlane, layout: str, n: int, watchers: int, wave_nodes: int, lean: bool,
                 monitor: Monitor | None = None, threads: int = 6) -> None:
        import threading

        self.cp, self.layout, self.n, self.lean = cp, layout, n, lean
        self.monitor = monitor or Monitor(f"{layout} {n}", {})
        self.threads = threads
        self._lock = threading.Lock()
        self.retries = self.conflicts = 0
        self.kube = k8s.Kube.from_kubeconfig(cp.kubeconfig)
        self.kube._timeout = 120.0
        self.objs: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 0
        self.changer = n // 3 + 1
        self.sample = sorted({(k * n) // wave_nodes + 2 for k in range(wave_nodes)} - {self.changer})
        stunless = [j for j in range(n) if is_stunless(j)]
        self.observed: dict[int, list[int]] = {}
        for j in stunless:
            for k in observers(j, n, layout == "split"):
                self.observed.setdefault(k, []).append(j)
        # Spread over the mesh, plus the addressees of a few sampled nodes' signals (so signal
        # events are measured too: each reaches exactly one agent).
        addressees = sorted({j for i in self.sample for j in self._signals_of(i)}, key=lambda j: _frac("w", j))[:3]
        spread = [i * n // watchers for i in range(watchers)]
        self.watching = sorted(set(spread[:watchers - len(addressees)]) | set(addressees))

    def pid(self, proc: str) -> int:
        return self.cp.processes()[proc]

    def _retrying(self, call: Any) -> Any:
        """An overloaded API server answers 504 (its own 60 s request deadline), 429, or the client
        times out: try again with a growing pause, for about 2 minutes in all. Counted in the row."""
        from wirekube import errors

        for attempt, pause in enumerate(RETRY_PAUSES_S):
            try:
                return call()
            except errors.Temporary as e:
                with self._lock:
                    self.retries += 1
                print(f"watch {self.layout} {self.n}: retry {attempt + 1} after {type(e).__name__}: "
                      f"{str(e)[:160]}", file=sys.stderr, flush=True)
                self.monitor.check()
                time.sleep(pause)
        return call()

    def _put_status(self, res: k8s.Resource, i: int, status: dict[str, Any]) -> tuple[int, float]:
        from wirekube import errors

        key = (res.plural, name(i))
        body = dict(self.objs[key])
        body["status"] = status
        t = time.monotonic()

        def put() -> Any:
            try:
                return self.kube.replace_status(res, body)
            except errors.Conflict:
                # A write that timed out on our side but went through moved the resourceVersion:
                # the status is whole (not a patch), so writing it again on the latest is the same write.
                with self._lock:
                    self.conflicts += 1
                body["metadata"] = self.kube.get(res, name(i))["metadata"]
                return self.kube.replace_status(res, body)
        out = self._retrying(put)
        self.objs[key] = out
        return int(out["metadata"]["resourceVersion"]), t

    def _create(self, res: k8s.Resource, body: dict[str, Any]) -> dict[str, Any]:
        from wirekube import errors

        def create() -> Any:
            try:
                return self.kube.create(res, body)
            except errors.AlreadyExists:  # a retried create that had gone through
                return self.kube.get(res, body["metadata"]["name"])
        out: dict[str, Any] = self._retrying(create)
        self.objs[(res.plural, body["metadata"]["name"])] = out
        return out

    def populate(self) -> float:
        """Every node's objects, written by a few threads (as N agents would, concurrently; bounded,
        so a 2-core machine's API server is not buried), with a progress line every 500 nodes."""
        import concurrent.futures

        done = [0]

        def node(i: int) -> None:
            self.monitor.check()
            populate_node(i)
            with self._lock:
                done[0] += 1
                if done[0] % 500 == 0 or done[0] == self.n:
                    self.monitor.phase = f"populate {done[0]}/{self.n}"
                    print(f"watch {self.layout} {self.n}: {self.monitor.line()}; retries {self.retries}",
                          file=sys.stderr, flush=True)

        def populate_node(i: int) -> None:
            self._create(k8s.PEERS, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer",
                                     "metadata": {"name": name(i), "labels": {"wirekube.io/node": name(i)}},
                                     "spec": spec(i)})
            if self.layout == "v1alpha1":
                self._put_status(k8s.PEERS, i, v1_status(i, self.n, 0, self.observed))
                return
            self._put_status(k8s.PEERS, i, facts(i, -1))
            if self.lean and i not in self.sample and i != self.changer:
                return
            self._create(REPORTS, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeNodeReport",
                                   "metadata": {"name": name(i), "labels": {"wirekube.io/node": name(i)}}})
            self._put_status(REPORTS, i, split_report(i, self.n, 0))
            for j, (obs, bday) in self._signals_of(i).items():
                self._create(SIGNALS, signal_body(i, j, 0, obs, bday))

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            futures = [pool.submit(node, i) for i in range(self.n)]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return time.monotonic() - t0

    def _signals_of(self, i: int) -> dict[int, tuple[bool, bool]]:
        out = {j: (True, False) for j in self.observed.get(i, [])}
        for j in birthday_peers(i, self.n):
            out[j] = (out.get(j, (False, False))[0], True)
        return out

    def streams(self) -> list[dict[str, Any]]:
        rv = self._collection_rv(k8s.PEERS)
        out = [{"stream": f"agent/{name(i)}/peers", "path": k8s.PEERS.path(), "rv": rv} for i in self.watching]
        if self.layout == "split":
            srv = self._collection_rv(SIGNALS)
            out += [{"stream": f"agent/{name(i)}/signals", "path": SIGNALS.path(), "rv": srv,
                     "selector": f"wirekube.io/to={name(i)}"} for i in self.watching]
            out.append({"stream": "reader/reports", "path": REPORTS.path(), "rv": self._collection_rv(REPORTS)})
        return out

    def _collection_rv(self, res: k8s.Resource) -> str:
        return str(self.kube._request("GET", res.path(), query={"limit": 1})["metadata"]["resourceVersion"])

    # ---- the writes --------------------------------------------------------------------------------

    def transport_change(self, i: int, flip: int) -> list[tuple[str, str, int, float]]:
        """Node i's transport to node ``flip`` changes: what today's agent writes, what the split one writes."""
        self.version += 1
        if self.layout == "v1alpha1":
            rv, t = self._put_status(k8s.PEERS, i, v1_status(i, self.n, self.version, self.observed, flip))
            return [("peers", name(i), rv, t)]
        rv, t = self._put_status(REPORTS, i, split_report(i, self.n, self.version, flip))
        return [("reports", name(i), rv, t)]

    def facts_change(self, i: int) -> list[tuple[str, str, int, float]]:
        """A per-node fact changes (e.g. the NAT type is found): every agent needs this one."""
        self.version += 1
        if self.layout == "v1alpha1":
            status = v1_status(i, self.n, self.version, self.observed)
        else:
            status = facts(i, -1)
        status["natPortStep"] = self.version % 7 + 1
        rv, t = self._put_status(k8s.PEERS, i, status)
        return [("peers", name(i), rv, t)]

    def signals_change(self, i: int) -> list[tuple[str, str, int, float]]:
        """Node i re-proposes its birthday rounds / re-reports observed endpoints (split: one signal per pair)."""
        self.version += 1
        out = []
        for j, (obs, bday) in self._signals_of(i).items():
            key = (SIGNALS.plural, f"{name(i)}.{name(j)}")
            body = dict(self.objs[key])
            body["spec"] = signal_body(i, j, self.version, obs, bday)["spec"]
            t = time.monotonic()
            self.objs[key] = self._retrying(lambda body=body: self.kube.replace(SIGNALS, body))
            out.append(("signals", key[1], int(self.objs[key]["metadata"]["resourceVersion"]), t))
        return out

    def wave_writes(self, i: int) -> list[tuple[str, str, int, float]]:
        """One node's part in a convergence wave (a relay outage and recovery): its transports
        rewritten three times (v1alpha1: three whole-status writes carrying everything; split:
        three report writes), and its pair coordination re-sent once (split: one signal per pair)."""
        writes = self.transport_change(i, (i + 1) % self.n)
        writes += self.transport_change(i, (i + 2) % self.n)
        writes += self.transport_change(i, (i + 3) % self.n)
        if self.layout == "split":
            writes += self.signals_change(i)
        return writes


def relay_condition_probe(workdir: Path, nodes: int = 5000) -> dict[str, Any]:
    """The bench's WireKubePeer carries no agent condition. The agent sets ``RelayUnreachable``
    (agent/traversalstatus.py) when every relay address has failed: True during a full relay outage,
    False ("Connected") after it, and it stays. Written where the agent writes it (on the
    WireKubePeer before ``conditions`` joined wirekube.models.REPORT_FIELDS, on the node's
    WireKubeNodeReport since), against the real API server with one node of the split layout's
    shape (the bytes do not depend on N): the peer object's size in each state, the watch events
    each write sends to every agent (a sentinel peer's write after it proves the stream saw
    everything before), and what a relay outage and its recovery cost at ``nodes``."""
    from wirekube.gateway import conditions as cond
    from wirekube.models import REPORT_FIELDS

    on_report = "conditions" in REPORT_FIELDS
    i, sentinel = nodes // 3 + 1, nodes // 3 + 2
    cp = ControlPlane(workdir / "relay-condition").up()
    try:
        kube = k8s.Kube.from_kubeconfig(cp.kubeconfig)
        kube.apply(k8s.CRDS, _bench_crd(REPORTS, "WireKubeNodeReport", True))
        deadline = time.monotonic() + 60
        while True:
            try:
                kube.list(REPORTS)
                break
            except Exception:  # the CRD is not served yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for n in (i, sentinel):
            obj = kube.create(k8s.PEERS, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer",
                                          "metadata": {"name": name(n), "labels": {"wirekube.io/node": name(n)}},
                                          "spec": spec(n)})
            kube.replace_status(k8s.PEERS, {**obj, "status": facts(n, -1)})
        kube.create(REPORTS, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeNodeReport",
                              "metadata": {"name": name(i)}})
        obj = kube.get(k8s.PEERS, name(i))
        sizes = {"bench_shape": len(json.dumps(obj))}
        stream = f"agent/{name(0)}/peers"
        w = Watchers(cp, [{"stream": stream, "path": k8s.PEERS.path(), "rv": obj["metadata"]["resourceVersion"]}], "")
        try:
            # The relay-path's message names every relay address with its error (traversal/relaypath.py).
            message = ("tcp://198.51.100.10:8443: [Errno 111] Connection refused; "
                       "tcp://198.51.100.11:8443: [Errno 111] Connection refused")
            now = time.time()
            conditions: list[dict[str, Any]] = list((obj.get("status") or {}).get("conditions") or [])
            events = []
            for state, (status, reason, msg) in (("true", (True, "Unreachable", message)),
                                                 ("false_stays", (False, "Connected", "relay connected over tcp"))):
                conditions = cond.set_condition(conditions, "RelayUnreachable", status, reason, msg, now, 0)
                now += 60
                w.reset()
                kube.patch_status(REPORTS if on_report else k8s.PEERS, name(i), {"status": {"conditions": conditions}})
                mark = kube.patch_status(k8s.PEERS, name(sentinel), {"status": {"natPortStep": int(now) % 1000}})
                rep = w.wait_for(stream, name(sentinel), int(mark["metadata"]["resourceVersion"]), timeout=60)
                sizes[f"relay_unreachable_{state}"] = len(json.dumps(kube.get(k8s.PEERS, name(i))))
                events.append(sum(e[2] for e in rep["events"][stream] if e[0] == name(i)))
        finally:
            w.close()
        kube.close()
    finally:
        cp.down()
    return {"written_to": "WireKubeNodeReport" if on_report else "WireKubePeer",
            "peer_object_bytes": sizes, "watch_event_bytes_per_agent": {"true": events[0], "false": events[1]},
            "nodes": nodes, "relay_message_addresses": 2,
            "outage_and_recovery_watch_gb": round(sum(events) * nodes * nodes / 1e9, 1),
            "goal_peer_object_bytes": 2048, "goal_wave_watch_gb": 20}


def _sum_streams(rep: dict[str, Any], prefix: str, suffix: str = "") -> list[int]:
    return [v for k, v in rep["counts"].items() if k.startswith(prefix) and k.endswith(suffix)]


def run_layout(layout: str, sizes: list[int], watchers: int, wave_nodes: int, workdir: Path,
               lean_from: int = 5000, threads: int = 6) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        lean = n >= lean_from
        cp = ControlPlane(workdir / f"{layout}-{n}").up()
        monitor = Monitor(f"{layout} {n}", {p: cp.processes()[p] for p in ("kube-apiserver", "etcd")}).start()
        try:
            if layout == "split":
                cp_kube = k8s.Kube.from_kubeconfig(cp.kubeconfig)
                for res, kind, st in ((REPORTS, "WireKubeNodeReport", True), (SIGNALS, "WireKubePairSignal", False)):
                    cp_kube.apply(k8s.CRDS, _bench_crd(res, kind, st))
                cp_kube.close()
                deadline = time.monotonic() + 60
                while True:
                    try:
                        k8s.Kube.from_kubeconfig(cp.kubeconfig).list(SIGNALS)
                        k8s.Kube.from_kubeconfig(cp.kubeconfig).list(REPORTS)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
            monitor.phase = "planning the objects"
            b = Bench(cp, layout, n, watchers, wave_nodes, lean, monitor, threads)
            api, etcd = b.pid("kube-apiserver"), b.pid("etcd")
            monitor.phase = "populate"
            populate_s = b.populate()
            monitor.phase = "measure"
            row: dict[str, Any] = {"layout": layout, "nodes": n, "watching_agents": len(b.watching),
                                   "lean": lean and layout == "split",
                                   "populate_s": round(populate_s, 1), **_etcd_mb(cp),
                                   "apiserver_rss_mb_populated": round(_rss_mb(api), 1)}
            # Every node's WireKubePeer as the API server returned it (rows without
            # peer_objects_measured, before 2026-12-07 19:40, sampled 50 of them).
            sizes_ = [len(json.dumps(b.objs[(k8s.PEERS.plural, name(i))])) for i in range(n)]
            row["peer_object_bytes_median"] = int(statistics.median(sizes_))
            row["peer_object_bytes_max"] = max(sizes_)
            row["peer_objects_measured"] = len(sizes_)
            if layout == "split":
                rs = [len(json.dumps(b.objs[(REPORTS.plural, name(i))])) for i in b.sample]
                row["report_object_bytes_median"] = int(statistics.median(rs))
                row["pair_signals"] = sum(1 for k in b.objs if k[0] == SIGNALS.plural)
            decode = f"agent/{name(b.watching[1 if len(b.watching) > 1 else 0])}/"
            w = Watchers(cp, b.streams(), decode)
            last_agent = f"agent/{name(b.watching[-1])}/peers"
            try:
                def settle(writes: list[tuple[str, str, int, float]]) -> dict[str, Any]:
                    """Wait until the writes' last event reached its readers; where no agent is due
                    anything, give the watch cache 1 s more to deliver something anyway."""
                    peers_ = [x for x in writes if x[0] == "peers"]
                    reps = [x for x in writes if x[0] == "reports"]
                    rep_ = w.report()
                    if peers_:
                        rep_ = w.wait_for(last_agent, peers_[-1][1], peers_[-1][2])
                    if reps and layout == "split":
                        rep_ = w.wait_for("reader/reports", reps[-1][1], reps[-1][2])
                    if layout == "split":
                        time.sleep(1.0)
                        rep_ = w.report()
                    return rep_

                def per_agent_bytes(rep_: dict[str, Any]) -> dict[str, int]:
                    out: dict[str, int] = {}
                    for k, v in rep_["counts"].items():
                        if k.startswith("agent/"):
                            out[k.split("/")[1]] = out.get(k.split("/")[1], 0) + v
                    return out

                def latencies(rep_: dict[str, Any], writes: list[tuple[str, str, int, float]]) -> list[float]:
                    when = {(x[1], x[2]): x[3] for x in writes}
                    return sorted(e[3] - when[(e[0], e[1])] for st, evs in rep_["events"].items()
                                  if st.startswith("agent/") or st.startswith("reader/")
                                  for e in evs if (e[0], e[1]) in when)

                def one(kind: str, writes_of: Any) -> dict[str, Any]:
                    w.reset()
                    c0, a0 = _cpu_s(api), _cpu_s(etcd)
                    writes = writes_of()
                    rep_ = settle(writes)
                    by_agent = per_agent_bytes(rep_)
                    lat = latencies(rep_, writes)
                    return {"bytes_per_agent_max": max(by_agent.values(), default=0),
                            "bytes_per_agent_mean": round(sum(by_agent.values()) / len(b.watching), 1),
                            "bytes_to_report_reader": sum(_sum_streams(rep_, "reader/")),
                            "latency_ms_median": round(1000 * statistics.median(lat), 1) if lat else None,
                            "fanout_bytes_at_n_agents": round(sum(by_agent.values()) / len(b.watching) * n),
                            "apiserver_cpu_s": round(_cpu_s(api) - c0, 3), "etcd_cpu_s": round(_cpu_s(etcd) - a0, 3)}

                # One status change: node `changer`'s transport to one peer flips.
                row["one_change"] = one("transport", lambda: b.transport_change(b.changer, b.changer + 1))
                # One per-node fact changes: every agent needs it, in either layout.
                row["one_fact_change"] = one("fact", lambda: b.facts_change(b.changer))
                # A sample of a convergence wave.
                w.reset()
                c0, a0 = _cpu_s(api), _cpu_s(etcd)
                t0 = time.monotonic()
                all_writes = []
                for i in b.sample:
                    all_writes += b.wave_writes(i)
                wave_s = time.monotonic() - t0
                rep = settle(all_writes)
                api_cpu, etcd_cpu = _cpu_s(api) - c0, _cpu_s(etcd) - a0
                by_agent = per_agent_bytes(rep)
                lat = latencies(rep, all_writes)
                sample = b.sample
                bytes_per_agent_per_node = sum(by_agent.values()) / len(b.watching) / len(sample)
                # Per kind: every agent watches every WireKubePeer; a pair signal reaches exactly
                # one agent (its addressee); a report none. Event sizes as the watchers received them.
                when = {(x[1], x[2]) for x in all_writes}
                event_sizes: dict[str, list[int]] = {"peers": [], "signals": []}
                for st, evs in rep["events"].items():
                    kind_ = st.rsplit("/", 1)[-1]
                    if st.startswith("agent/") and kind_ in event_sizes:
                        event_sizes[kind_] += [e[2] for e in evs if (e[0], e[1]) in when]
                per_node = {k: sum(1 for x in all_writes if x[0] == k) / len(sample)
                            for k in ("peers", "signals", "reports")}
                event = {k: (statistics.mean(v) if v else 0.0) for k, v in event_sizes.items()}
                wave_bytes = n * (per_node["peers"] * n * event["peers"] + per_node["signals"] * 1 * event["signals"])
                row["wave_sample"] = {
                    "nodes": len(sample), "writes": len(all_writes), "seconds": round(wave_s, 2),
                    "bytes_per_agent": round(sum(by_agent.values()) / len(b.watching)),
                    "bytes_per_agent_max": max(by_agent.values(), default=0),
                    "bytes_per_agent_per_node": round(bytes_per_agent_per_node),
                    "bytes_to_report_reader": sum(_sum_streams(rep, "reader/")),
                    "agent_decode_cpu_s": round(rep["decode_cpu_s"], 4),
                    "agent_decode_cpu_s_per_node": round(rep["decode_cpu_s"] / len(sample), 6),
                    "latency_ms_median": round(1000 * statistics.median(lat), 1) if lat else None,
                    "latency_ms_p99": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1) if lat else None,
                    "apiserver_cpu_s": round(api_cpu, 2), "etcd_cpu_s": round(etcd_cpu, 2),
                    "apiserver_rss_mb": round(_rss_mb(api), 1), "etcd_rss_mb": round(_rss_mb(etcd), 1)}
                # The whole wave: every node does its part, N agents watch (linear in watchers).
                row["wave_total"] = {
                    "writes": round(len(all_writes) / len(sample) * n),
                    "writes_per_node": {k: round(v, 2) for k, v in per_node.items()},
                    "event_bytes_mean": {k: round(v) for k, v in event.items()},
                    "agents_per_event": {"peers": n, "signals": 1, "reports": 0},
                    "watch_bytes": round(wave_bytes),
                    "watch_gb": round(wave_bytes / 1e9, 3),
                    "watch_gb_from_sampled_watchers": round(bytes_per_agent_per_node * n * n / 1e9, 3),
                    "agent_decode_cpu_s": round(rep["decode_cpu_s"] / len(sample) * n, 2),
                    "apiserver_cpu_s_extrapolated": round(api_cpu / len(sample) * n, 1)}
                row.update(_etcd_mb(cp))
                monitor.check()
            finally:
                w.close()
            b.kube.close()
            row["retries"], row["conflicts_rewritten"] = b.retries, b.conflicts
        except BaseException as e:
            print(f"watch {layout} {n}: FAILED ({type(e).__name__}: {str(e)[:300]}) at {monitor.line()}",
                  file=sys.stderr, flush=True)
            raise
        finally:
            row_during = monitor.stop()
            cp.down()
        row["during_run"] = row_during
        print(f"watch {layout} {n}: {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def projection(rows: list[dict[str, Any]], target: int) -> dict[str, Any]:
    """Per-layout figures at ``target`` nodes, from the largest measured N: object size and
    per-watcher bytes per change grow linearly in N with the v1alpha1 layout (fit through the
    measured points), stay flat with the split one; the wave multiplies by 3N writes and N watchers."""
    out: dict[str, Any] = {}
    for layout in sorted({r["layout"] for r in rows}):
        pts = sorted((r["nodes"], r) for r in rows if r["layout"] == layout)
        measured = next((r for n, r in pts if n == target), None)
        if measured is not None:
            out[layout] = {"measured": True, "peer_object_bytes": measured["peer_object_bytes_max"],
                           "one_change_bytes_per_agent": measured["one_change"]["bytes_per_agent_max"],
                           "one_fact_change_bytes_per_agent": measured["one_fact_change"]["bytes_per_agent_max"],
                           "wave_watch_gb": measured["wave_total"]["watch_gb"]}
            continue
        if len(pts) < 2:
            continue
        (n1, r1), (n2, r2) = pts[-2], pts[-1]

        def lin(get: Any) -> float:
            a, b = float(get(r1)), float(get(r2))
            return float(b + (b - a) / (n2 - n1) * (target - n2))
        # The wave: writes per node (flat in N) x agents per event (N for peers, 1 for signals)
        # x event bytes (linear in N for a v1alpha1 peer, flat for a signal), times N nodes.
        wt = r2["wave_total"]
        peer_event = lin(lambda r: r["wave_total"]["event_bytes_mean"]["peers"])
        # A signal's size does not depend on N: the largest one measured at any N.
        signal_event = max(r["wave_total"]["event_bytes_mean"]["signals"] for _, r in pts)
        wave = target * (wt["writes_per_node"]["peers"] * target * peer_event
                         + wt["writes_per_node"]["signals"] * signal_event)
        out[layout] = {"measured": False, "from_nodes": [n1, n2],
                       "peer_object_bytes": round(lin(lambda r: r["peer_object_bytes_max"])),
                       "one_change_bytes_per_agent": round(lin(lambda r: r["one_change"]["bytes_per_agent_max"])),
                       "one_fact_change_bytes_per_agent": round(lin(
                           lambda r: r["one_fact_change"]["bytes_per_agent_max"])),
                       "wave_watch_gb": round(wave / 1e9, 3)}
    return out
