"""``wirekubectl doctor --local`` against a network namespace this test builds (issue #9).

The namespace gets what a killed agent leaves behind (a ``wire_kube`` link, WireKube's rules, a
route in table 22347, the ``inet wirekube`` nft table); the doctor must call it stale and exit 1.
With a real agent health endpoint answering inside the namespace the same state is a working
dataplane (exit 0); after ``wirekubectl cleanup`` nothing is stale (exit 0).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.fixtures.root import require_root
from wirekube.cli import nodestate
from wirekube.metrics import serve

pytestmark = [pytest.mark.netns]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


@pytest.fixture
def netns() -> Iterator[str]:
    require_root("network namespaces and nftables")
    if shutil.which("nft") is None:
        pytest.skip("needs nft (ci/setup.sh installs it)")
    name = f"wkt-doctor-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def leave_stale_state(ns: str) -> None:
    """What `kill -9` of an agent leaves (minus the daemon): link, rules, table 22347, nft table."""
    sh("ip", "-n", ns, "tuntap", "add", "wire_kube", "mode", "tun")
    sh("ip", "-n", ns, "link", "set", "wire_kube", "up")
    sh("ip", "-n", ns, "rule", "add", "pref", "100", "fwmark", "0x574b", "lookup", "main")
    sh("ip", "-n", ns, "rule", "add", "pref", "200", "lookup", "22347")
    sh("ip", "-n", ns, "route", "add", "10.255.7.7/32", "dev", "wire_kube", "table", "22347")
    sh("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "wirekube")
    sh("ip", "netns", "exec", ns, "nft", "add", "chain", "inet", "wirekube", "forward",
       "{ type filter hook forward priority 0 ; }")


def doctor(ns: str, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run([sys.executable, "-m", "wirekube.cli.wirekubectl", "doctor", "--local", "--netns", ns,
                           "-o", "json", *extra], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def verdicts(findings: list[dict[str, Any]], check: str) -> dict[str, str]:
    return {f["subject"]: f["verdict"] for f in findings if f["check"] == check}


def test_stale_state_is_flagged_until_an_agent_answers_or_cleanup_runs(netns: str) -> None:
    code, findings = doctor(netns)
    assert code == 0 and verdicts(findings, "stale-state") == {"node": "ok"}, findings

    leave_stale_state(netns)
    code, findings = doctor(netns)
    assert code == 1, findings
    assert verdicts(findings, "stale-state") == {"link wire_kube": "fail", "ip rules": "fail",
                                                 "table 22347": "fail", "nft inet wirekube": "fail"}
    assert verdicts(findings, "agent-running") == {nodestate.DEFAULT_AGENT_URL: "fail"}
    rules = next(f for f in findings if f["subject"] == "ip rules")
    assert "pref 100 fwmark 0x574b" in rules["detail"] and "pref 200 lookup 22347" in rules["detail"]
    assert all("wirekubectl cleanup" in f["fix"] for f in findings if f["check"] == "stale-state")

    # A real agent health endpoint inside the namespace: the same state is now a live dataplane.
    server = nodestate.in_netns(netns, lambda: serve("127.0.0.1", 0, CollectorRegistry(), lambda: True))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        code, findings = doctor(netns, "--agent-url", url)
        assert code == 0, findings
        assert verdicts(findings, "agent-running") == {url: "ok"}
        assert set(verdicts(findings, "local-dataplane").values()) == {"ok"}
        assert not verdicts(findings, "stale-state")
    finally:
        server.shutdown()
        server.server_close()

    clean = sh("ip", "netns", "exec", netns, sys.executable, "-m", "wirekube.cli.wirekubectl", "cleanup")
    assert json.loads(clean.stdout.strip().splitlines()[-1])["changed"] is True
    code, findings = doctor(netns)
    assert code == 0 and verdicts(findings, "stale-state") == {"node": "ok"}, findings
    assert sh("ip", "-n", netns, "rule", "show").stdout.count("22347") == 0
