"""Kernel nodes in the lab (wirekube.lab.vm) and the topology's ``engine`` field: the pure parts.

The VMs themselves run in tests/integration/test_lab_kernel.py."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from wirekube.lab import vm
from wirekube.lab.topology import TopologyError, parse_topology


def _doc(**node: Any) -> dict[str, Any]:
    return {"sites": [{"name": "cloud", "nat": "none", "nodes": [{"name": "k1", **node}, {"name": "u1"}]}]}


def test_engine_kernel_is_parsed_and_round_trips() -> None:
    topo = parse_topology(_doc(engine="kernel"))
    nodes = {n.name: n for n in topo.sites[0].nodes}
    assert nodes["k1"].engine == "kernel"
    assert nodes["u1"].engine == "userspace"
    again = parse_topology(topo.to_dict())
    assert again == topo
    assert topo.to_dict()["sites"][0]["nodes"][1].get("engine") is None  # the default stays implicit


@pytest.mark.parametrize(("node", "path", "message"), [
    ({"engine": "kvm"}, "sites[0].nodes[0].engine", "must be one of userspace, kernel, not 'kvm'"),
    ({"engine": "kernel", "pods": 1, "podCIDR": "10.100.1.0/24"}, "sites[0].nodes[0].pods",
     "a node with engine: kernel (a VM) cannot have pods"),
])
def test_engine_mistakes_are_reported_at_their_path(node: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(TopologyError, match=re.escape(f"{path}: {message}")) as info:
        parse_topology(_doc(**node))
    assert (path, message) in list(info.value.problems)


def test_mac_addresses_are_stable_unicast_and_distinct() -> None:
    a = vm.mac_for("lab", "k1", "lan")
    assert a == vm.mac_for("lab", "k1", "lan")
    assert len({a, vm.mac_for("lab", "k1", "mgmt"), vm.mac_for("lab", "k2", "lan"), vm.mac_for("x", "k1", "lan")}) == 4
    first = int(a.split(":")[0], 16)
    assert first & 1 == 0 and first & 2 == 2  # unicast, locally administered


def test_shell_links_bridge_each_node_link_with_its_tap_and_drop_the_addresses() -> None:
    lines = vm.shell_links("eth0", "mgmt")
    assert lines[:2] == ["addr flush dev eth0", "addr flush dev mgmt"]
    assert "link set dev eth0 master brlan" in lines and "link set dev vmlan master brlan" in lines
    assert "link set dev mgmt master brmgmt" in lines and "link set dev vmmgmt master brmgmt" in lines


def test_qemu_has_no_network_but_the_two_taps(tmp_path: Path) -> None:
    pieces = vm.GuestPieces(tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "modules")
    config = vm.GuestConfig("k1", "198.19.1.10/24", "198.19.1.1", "10.254.0.10/32", "10.254.0.1", 6443,
                            "52:54:00:00:00:01", "52:54:00:00:00:02", str(tmp_path / "tok"), str(tmp_path), ())
    if vm._qemu() is None:
        pytest.skip("qemu-system-x86_64 not installed (ci/build-vm.sh installs it)")
    argv = vm.qemu_argv(pieces, config, tmp_path / "c.json", tmp_path)
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    assert [n.split(",")[0] for n in netdevs] == ["tap", "tap"]
    assert all("script=no" in n for n in netdevs)
    assert "-nodefaults" in argv  # no default (user-mode) NIC
    assert not any(a.startswith("user") or ",user" in a for a in argv)
    assert "readonly=on" in argv[argv.index("-virtfs") + 1]  # the host root is shared read-only
    keep = next(w for w in argv[argv.index("-append") + 1].split() if w.startswith("wk.keep="))
    assert str(Path(__file__).resolve().parents[1]) in keep.split("=", 1)[1].split(",")  # tests/ under /tmp too
    assert argv[:4] == ["nice", "-n", str(vm.QEMU_NICE), vm._qemu()]


def test_frames_round_trip_and_split_anywhere() -> None:
    a, b = socket.socketpair()
    payloads = [(b"h", b'{"token": "t"}'), (b"o", b"x" * 70000), (b"x", b"0"), (b"e", b"")]
    data = b"".join(vm._HDR.pack(k, len(p)) + p for k, p in payloads)

    def dribble() -> None:
        for i in range(0, len(data), 7777):
            a.sendall(data[i:i + 7777])
        a.close()

    t = threading.Thread(target=dribble)
    t.start()
    got = []
    while (frame := vm.recv_frame(b)) is not None:
        got.append(frame)
    t.join()
    assert got == payloads


def test_an_oversized_frame_is_refused() -> None:
    a, b = socket.socketpair()
    a.sendall(vm._HDR.pack(b"o", vm.MAX_FRAME + 1))
    with pytest.raises(ValueError, match="exceeds"):
        vm.recv_frame(b)


def test_exec_client_says_in_one_line_when_the_guest_is_unreachable(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "tok"
    token.write_text("t")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    assert vm.exec_main(f"127.0.0.1:{port}", str(token), ["true"]) == 255
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the guest" in err[0]


def test_command_server_runs_relays_and_checks_the_token() -> None:
    """The guest's per-connection handler, on a socketpair: output, exit code, bad token."""
    for token, argv, want_code, want_out in (("good", ["sh", "-c", "echo hi; echo err >&2; exit 3"], 3, b"hi\n"),
                                             ("bad", ["true"], 126, b"")):
        client, server = socket.socketpair()
        t = threading.Thread(target=vm._Command(server, "good").run)
        t.start()
        vm.send_frame(client, b"h", json.dumps({"token": token, "argv": argv}).encode())
        vm.send_frame(client, b"e", b"")
        out, code = b"", None
        while (frame := vm.recv_frame(client)) is not None:
            if frame[0] == b"o":
                out += frame[1]
            elif frame[0] == b"x":
                code = int(frame[1])
        t.join()
        assert (code, out) == (want_code, want_out)


def test_the_guest_config_carries_the_hosts_pythonpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands in the guest run the same code as the lab process (e.g. a snapshot of the tree)."""
    monkeypatch.setenv("PYTHONPATH", "/snap/python:/snap")
    config = vm.GuestConfig(node="k1", lan_address="192.168.1.10/24", gateway="192.168.1.1",
                            mgmt_address="10.254.0.10/32", api_address="10.254.0.1", api_port=6443,
                            lan_mac="52:54:00:00:00:01", mgmt_mac="52:54:00:00:00:02",
                            token_file=str(tmp_path / "tok"), modules_dir="/m", sysctls=())
    path = vm.write_guest_files(tmp_path, config)
    monkeypatch.delenv("PYTHONPATH")
    raw = json.loads(path.read_text())
    assert raw["pythonpath"] == "/snap/python:/snap"
    assert vm.GuestConfig(**{**raw, "sysctls": ()}).pythonpath == "/snap/python:/snap"
    assert vm.GuestConfig(**{k: v for k, v in raw.items() if k != "pythonpath"}).pythonpath == ""
