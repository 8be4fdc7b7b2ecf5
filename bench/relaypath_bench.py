#!/usr/bin/env python3
"""The relayed WireGuard path in isolation: iperf3 over wireguard-go, direct vs relayed, and the CPU
seconds each process on the path spends per GB carried.

    .venv/bin/python bench/relaypath_bench.py [--rounds 4] [--seconds 6] [--streams 1,4]

A quicker and narrower stand-in for the iperf part of ``bench/nat_bench.py`` (no API server, no
NATs, no other nodes), for profiling the relay path while changing it:

    ns A (10.77.1.2) --veth-- ns R (router; the relay on 10.77.1.1:3478) --veth-- ns B (10.77.2.2)

Each of A and B runs wireguard-go (interface MTU 1420, like the mesh default) with the other as
its only peer, and a stand-in agent process (this file, ``--agent``): a uvloop loop in a thread
running :class:`wirekube.traversal.relaypath.RelayPath`, as the agent runs it, next to a 10 Hz and
a 2 Hz thread doing a little Python work, so the data path shares the GIL as in the agent.
*Direct*: each WireGuard endpoint is the other node's address.  *Relayed*: each endpoint is the
local proxy port for the peer, so packets go wireguard-go -> loopback UDP -> agent -> TCP -> relay
-> TCP -> agent -> loopback UDP -> wireguard-go.  Direct and relayed runs alternate within each
round (the order alternating between rounds), and each round's ratio is relayed / direct.

``--profile`` runs py-spy (if installed) on the agents and the relay during one relayed run and
prints the top functions.  Namespaces are named ``wkrp<hex>-{a,b,r}`` and removed at the end;
every process started is ended by PID.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
WG_PORT = 51820
MTU = 1420


# ---- the stand-in agent ---------------------------------------------------------------------------


def agent_main(args: argparse.Namespace) -> int:
    import asyncio

    import uvloop
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from wirekube.traversal.relaypath import RelayPath

    private = X25519PrivateKey.from_private_bytes(base64.b64decode(args.private_key))
    peer = base64.b64decode(args.peer_key)
    host, port = args.relay.rsplit(":", 1)
    loop = uvloop.new_event_loop()
    ready = threading.Event()

    def loop_main() -> None:
        asyncio.set_event_loop(loop)
        ready.set()
        loop.run_forever()

    threading.Thread(target=loop_main, name="traversal-loop", daemon=True).start()
    ready.wait(5)
    path = RelayPath(private, WG_PORT)

    async def setup() -> int:
        path.set_relays([(host, int(port))])
        deadline = time.monotonic() + 20
        while not path.connected_relays():
            if time.monotonic() > deadline:
                raise TimeoutError("relay not connected")
            await asyncio.sleep(0.02)
        return await path.ensure_proxy(peer)

    proxy_port = asyncio.run_coroutine_threadsafe(setup(), loop).result(30)
    stop = threading.Event()

    def busy(period: float) -> None:  # the agent's ticker and heartbeat: a little Python work
        while not stop.wait(period):
            sum(i * i for i in range(200))

    for period in (0.1, 0.5):
        threading.Thread(target=busy, args=(period,), daemon=True).start()
    print(json.dumps({"proxy_port": proxy_port}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    stop.set()
    stats = asyncio.run_coroutine_threadsafe(_close(path), loop).result(10)
    print(json.dumps({"stats": stats}), flush=True)
    return 0


async def _close(path: Any) -> dict[str, int]:
    stats = dict(vars(path.stats))
    await path.close()
    return stats


# ---- the harness ----------------------------------------------------------------------------------


def sh(*argv: str, check: bool = True, input: str | None = None) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


def proc_cpu(pid: int, part: str = "all") -> float:
    """User + system (or only ``user``/``sys``) CPU seconds of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    user, system = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    return {"all": user + system, "user": user, "sys": system}[part]


class Harness:
    def __init__(self, relay_args: list[str], relay_pythonpath: str = "", agent_pythonpath: str = "") -> None:
        self.relay_pythonpath = relay_pythonpath
        self.agent_pythonpath = agent_pythonpath
        self.tag = f"wkrp{uuid.uuid4().hex[:6]}"
        self.ns = {n: f"{self.tag}-{n}" for n in "abr"}
        self.ifname = {n: f"{self.tag}{n}" for n in "ab"}
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.relay_args = relay_args
        self.keys = {n: sh("wg", "genkey").strip() for n in "ab"}
        self.pubs = {n: sh("wg", "pubkey", input=self.keys[n]).strip() for n in "ab"}
        self.mesh = {"a": "10.78.0.1", "b": "10.78.0.2"}
        self.addr = {"a": "10.77.1.2", "b": "10.77.2.2"}
        self.proxy_port: dict[str, int] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix=self.tag))

    def ip(self, ns: str, *argv: str) -> str:
        return sh("ip", "-n", self.ns[ns], *argv)

    def exec_argv(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[ns], *argv]

    def spawn(self, name: str, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(self.exec_argv(ns, argv), start_new_session=True, **kw)
        self.procs[name] = p
        return p

    def up(self) -> None:
        for n in "abr":
            sh("ip", "netns", "add", self.ns[n])
            self.ip(n, "link", "set", "lo", "up")
        for n, net in (("a", "1"), ("b", "2")):
            sh("ip", "link", "add", "wk", "netns", self.ns[n], "type", "veth", "peer", "name", f"to{n}",
               "netns", self.ns["r"])
            self.ip(n, "addr", "add", f"10.77.{net}.2/24", "dev", "wk")
            self.ip(n, "link", "set", "wk", "up")
            self.ip(n, "route", "add", "default", "via", f"10.77.{net}.1")
            self.ip("r", "addr", "add", f"10.77.{net}.1/24", "dev", f"to{n}")
            self.ip("r", "link", "set", f"to{n}", "up")
        sh(*self.exec_argv("r", ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
        relay_log = open(self.tmp / "relay.log", "w")  # noqa: SIM115 - handed to the relay process
        env = {**os.environ, "PYTHONPATH": self.relay_pythonpath} if self.relay_pythonpath else None
        self.spawn("relay", "r", [sys.executable, "-m", "wirekube.relay.cli", "--listen", "10.77.1.1:3478",
                                  "--stun-listen", "10.77.1.1:3478", "--metrics-listen", "10.77.1.1:9100",
                                  *self.relay_args], stderr=relay_log, stdout=relay_log, env=env)
        deadline = time.monotonic() + 20
        while "10.77.1.1:3478" not in sh(*self.exec_argv("r", ["ss", "-Hltn"])):
            if time.monotonic() > deadline or self.procs["relay"].poll() is not None:
                raise RuntimeError(f"relay did not start: {(self.tmp / 'relay.log').read_text()[-2000:]}")
            time.sleep(0.05)
        for n in "ab":
            self.spawn(f"wg-{n}", n, ["env", "LOG_LEVEL=error", "wireguard-go", "-f", self.ifname[n]],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n in "ab":
            sock = Path(f"/var/run/wireguard/{self.ifname[n]}.sock")
            deadline = time.monotonic() + 10
            while not sock.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("wireguard-go did not start")
                time.sleep(0.02)
            other = "b" if n == "a" else "a"
            keyfile = self.tmp / f"key-{n}"
            keyfile.write_text(self.keys[n])
            sh(*self.exec_argv(n, ["wg", "set", self.ifname[n], "listen-port", str(WG_PORT), "private-key",
                                   str(keyfile), "peer", self.pubs[other], "allowed-ips", f"{self.mesh[other]}/32",
                                   "endpoint", f"{self.addr[other]}:{WG_PORT}"]))
            self.ip(n, "addr", "add", f"{self.mesh[n]}/32", "peer", f"{self.mesh[other]}/32", "dev",
                    self.ifname[n])
            self.ip(n, "link", "set", self.ifname[n], "mtu", str(MTU), "up")
        for n in "ab":
            other = "b" if n == "a" else "a"
            env = {**os.environ, "PYTHONPATH": self.agent_pythonpath} if self.agent_pythonpath else None
            p = self.spawn(f"agent-{n}", n, [sys.executable, __file__, "--agent", "--private-key", self.keys[n],
                                             "--peer-key", self.pubs[other], "--relay", "10.77.1.1:3478"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"agent {n} failed")
            self.proxy_port[n] = json.loads(line)["proxy_port"]
        self.spawn("iperf-server", "b", ["iperf3", "-s", "-B", self.mesh["b"]], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while f"{self.mesh['b']}:5201" not in sh(*self.exec_argv("b", ["ss", "-Hltn"])):
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.05)

    def endpoint(self, n: str, transport: str) -> str:
        other = "b" if n == "a" else "a"
        return f"{self.addr[other]}:{WG_PORT}" if transport == "direct" else f"127.0.0.1:{self.proxy_port[n]}"

    def endpoints_are(self, transport: str) -> bool:
        for n in "ab":
            shown = sh(*self.exec_argv(n, ["wg", "show", self.ifname[n], "endpoints"])).split()
            if len(shown) != 2 or shown[1] != self.endpoint(n, transport):
                return False
        return True

    def set_transport(self, transport: str) -> None:
        """Point both WireGuards at the transport's endpoints.  Packets still in flight on the
        old path make WireGuard roam back to it, so set, ping, and set again until both ends
        stay put."""
        for _ in range(10):
            for n in "ab":
                other = "b" if n == "a" else "a"
                sh(*self.exec_argv(n, ["wg", "set", self.ifname[n], "peer", self.pubs[other], "endpoint",
                                       self.endpoint(n, transport)]))
            for n in "ab":
                other = "b" if n == "a" else "a"
                sh(*self.exec_argv(n, ["ping", "-c", "3", "-i", "0.05", "-W", "2", self.mesh[other]]))
            if self.endpoints_are(transport):
                return
        raise RuntimeError(f"WireGuard would not stay on {transport}")

    def relay_counters(self) -> dict[str, float]:
        code = ("import urllib.request,re,json;t=urllib.request.urlopen('http://10.77.1.1:9100/metrics').read()"
                ".decode();print(json.dumps({m[0]+m[1]:float(m[2]) for m in re.findall("
                "r'^wirekube_relay_(forwarded_frames_total|dropped_frames_total|backpressure_holds_total)"
                "(\\{[^}]*\\})? (\\S+)$',t,re.M)}))")
        return json.loads(sh(*self.exec_argv("r", [sys.executable, "-c", code])))

    def cpu(self) -> dict[str, float]:
        out = {name: proc_cpu(p.pid) if name.startswith(("relay", "iperf")) else _tree_cpu(p.pid)
               for name, p in self.procs.items()}
        return out

    def cpu_split(self) -> dict[str, float]:
        """System CPU of the Python hops (the rest of their CPU is user time)."""
        out = {}
        for name in ("agent-a", "agent-b", "relay"):
            pid = _python_child(self.procs[name].pid)
            if pid:
                out[f"{name}.sys"] = proc_cpu(pid, "sys")
        return out

    def iperf(self, seconds: int, streams: int) -> dict[str, Any]:
        counters0 = self.relay_counters()
        before, split0, t0 = self.cpu(), self.cpu_split(), time.monotonic()
        _children_cpu_delta()
        r = subprocess.run(self.exec_argv("a", ["iperf3", "-c", self.mesh["b"], "-t", str(seconds), "-P",
                                                str(streams), "-J"]), capture_output=True, text=True)
        client_cpu = _children_cpu_delta()  # ip netns exec execs iperf3: the child is iperf3 itself
        elapsed = time.monotonic() - t0
        after, split1 = self.cpu(), self.cpu_split()
        counters = {k: v - counters0.get(k, 0.0) for k, v in self.relay_counters().items()
                    if v - counters0.get(k, 0.0)}
        end = json.loads(r.stdout)["end"]
        gb = end["sum_received"]["bytes"] / 1e9
        cpu = {k: round(after[k] - before[k], 3) for k in after}
        cpu["iperf-client"] = round(client_cpu, 3)
        return {"mbit_s": round(end["sum_received"]["bits_per_second"] / 1e6, 1),
                "retransmits": end["sum_sent"].get("retransmits", 0), "gb": round(gb, 4),
                "window_s": round(elapsed, 2), "load_average": [round(x, 2) for x in os.getloadavg()],
                "cpu_s": cpu, "cpu_s_per_gb": {k: round(v / gb, 2) for k, v in cpu.items()},
                "path_cpu_s_per_gb": round(sum(cpu.values()) / gb, 2),
                "relay_counters": counters,
                "python_hops_sys_s_per_gb": {k: round((split1[k] - split0.get(k, 0.0)) / gb, 2) for k in split1}}

    def profile(self, seconds: int, streams: int, outdir: Path) -> dict[str, str]:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            return {"error": "py-spy not installed"}
        targets = {"agent-a": _python_child(self.procs["agent-a"].pid),
                   "agent-b": _python_child(self.procs["agent-b"].pid),
                   "relay": _python_child(self.procs["relay"].pid)}
        spies = {name: subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250",
                                         "-f", "raw", "-o", str(outdir / f"{name}.txt"), "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, pid in targets.items() if pid}
        time.sleep(0.3)
        self.iperf(seconds, streams)
        for p in spies.values():
            p.wait(30)
        return {name: str(outdir / f"{name}.txt") for name in spies}

    def agent_stats(self) -> dict[str, Any]:
        """Each stand-in agent's PathStats (it prints them when its stdin closes)."""
        out = {}
        for n in "ab":
            p = self.procs.get(f"agent-{n}")
            if p is None or p.stdin is None or p.stdout is None or p.poll() is not None:
                continue
            p.stdin.close()
            with contextlib.suppress(ValueError, KeyError):
                out[n] = json.loads(p.stdout.readline())["stats"]
        return out

    def down(self) -> None:
        for p in list(self.procs.values()):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if p.stdin is not None:
                        with contextlib.suppress(OSError):
                            p.stdin.close()
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for n in "abr":
            sh("ip", "netns", "del", self.ns[n], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


_children_seen = [0.0]


def _children_cpu_delta() -> float:
    """CPU of waited-for children (the iperf3 client) since the last call."""
    t = os.times()
    total = t.children_user + t.children_system
    delta, _children_seen[0] = total - _children_seen[0], total
    return delta


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split())
    return out


def _tree_cpu(pid: int) -> float:
    return sum(proc_cpu(p) for p in _descendants(pid))


def _python_child(pid: int) -> int | None:
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            if b"python" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]:
                return p
    return None


def summarize(runs: list[dict[str, Any]], streams_list: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for streams in streams_list:
        mine = [r for r in runs if r["streams"] == streams]
        direct = {r["round"]: r for r in mine if r["transport"] == "direct"}
        relay = {r["round"]: r for r in mine if r["transport"] == "relay"}
        ratios = [round(relay[k]["mbit_s"] / direct[k]["mbit_s"], 3) for k in sorted(direct) if k in relay]
        per_gb = {}
        for name in relay[min(relay)]["cpu_s_per_gb"]:
            per_gb[name] = {"direct": statistics.median(r["cpu_s_per_gb"].get(name, 0) for r in direct.values()),
                            "relay": statistics.median(r["cpu_s_per_gb"].get(name, 0) for r in relay.values())}
        out[f"streams_{streams}"] = {
            "ratio_per_round": ratios, "ratio_median": statistics.median(ratios) if ratios else None,
            "direct_mbit_s": [direct[k]["mbit_s"] for k in sorted(direct)],
            "relay_mbit_s": [relay[k]["mbit_s"] for k in sorted(relay)],
            "path_cpu_s_per_gb": {"direct": statistics.median(r["path_cpu_s_per_gb"] for r in direct.values()),
                                  "relay": statistics.median(r["path_cpu_s_per_gb"] for r in relay.values())},
            "cpu_s_per_gb_median": per_gb,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--private-key", help=argparse.SUPPRESS)
    p.add_argument("--peer-key", help=argparse.SUPPRESS)
    p.add_argument("--relay", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=int, default=6)
    p.add_argument("--streams", default="1,4")
    p.add_argument("--only", choices=("direct", "relay"), help="run one transport only")
    p.add_argument("--profile", type=Path, help="directory for py-spy raw profiles of one relayed run")
    p.add_argument("--out", type=Path, help="write the runs and the summary here (JSON)")
    p.add_argument("--relay-args", default="", help="extra wirekube-relay arguments, e.g. '--backpressure-hold 0'")
    p.add_argument("--relay-pythonpath", default="",
                   help="run the relay from another source tree (PYTHONPATH), for before/after comparisons")
    p.add_argument("--agent-pythonpath", default="", help="the same for the stand-in agents")
    args = p.parse_args(argv)
    if args.agent:
        return agent_main(args)
    streams_list = [int(s) for s in args.streams.split(",")]
    h = Harness(["--log-level", "WARNING", *args.relay_args.split()], args.relay_pythonpath, args.agent_pythonpath)
    runs: list[dict[str, Any]] = []
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        h.up()
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            h.set_transport("relay")
            print(json.dumps(h.profile(args.seconds, streams_list[0], args.profile)), file=sys.stderr)
            return 0
        order = ["direct", "relay"] if args.only is None else [args.only]
        for rnd in range(1, args.rounds + 1):
            for transport in order if rnd % 2 else order[::-1]:
                h.set_transport(transport)
                for streams in streams_list:
                    r = {"round": rnd, "transport": transport, "streams": streams,
                         **h.iperf(args.seconds, streams), "endpoints_held": h.endpoints_are(transport)}
                    runs.append(r)
                    print(f"round {rnd} {transport:<6} P{streams}: {r['mbit_s']:7.1f} Mbit/s  "
                          f"path {r['path_cpu_s_per_gb']:6.2f} CPU s/GB  "
                          + " ".join(f"{k}={v}" for k, v in r["cpu_s_per_gb"].items())
                          + " sys:" + " ".join(f"{k}={v}" for k, v in r["python_hops_sys_s_per_gb"].items())
                          + f"  load {r['load_average'][0]} relay {r['relay_counters']}"
                          + ("" if r["endpoints_held"] else "  (WireGuard roamed during the run)"), file=sys.stderr)
        stats = h.agent_stats()
        print(json.dumps(stats), file=sys.stderr)
    finally:
        h.down()
    summary = summarize(runs, streams_list) if args.only is None else {}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "load_average_at_start": load_start,
                                        "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
