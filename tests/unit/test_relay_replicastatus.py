"""The relay replica's status Lease (pure parts) and how `wirekubectl status` shows it."""

from __future__ import annotations

from typing import Any

from wirekube.cli.status import build_report, render_json, render_table
from wirekube.relay.replicastatus import LABEL, LeasePublisher, LeaseSettings, lease_body, replica_rows

T0 = 1_800_000_000.0


def test_lease_body_carries_counts_owner_and_label() -> None:
    body = lease_body(LeaseSettings("relay-x", "ns", duration=60, owner_pod=("relay-x", "uid-1")), "ab12cd34", 7, 1, T0)
    assert body["metadata"]["labels"] == {LABEL: "true"}
    assert body["metadata"]["annotations"]["wirekube.io/relay-keys"] == "7"
    assert body["metadata"]["annotations"]["wirekube.io/relay-mesh-links"] == "1"
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "relay-x",
                                                    "uid": "uid-1"}]
    assert body["spec"]["holderIdentity"] == "ab12cd34"
    assert body["spec"]["renewTime"].endswith("Z")
    single = lease_body(LeaseSettings("relay-y", "ns"), "0000", 0, None, T0)
    assert "wirekube.io/relay-mesh-links" not in single["metadata"]["annotations"]
    assert "ownerReferences" not in single["metadata"]


def test_rows_round_trip_and_staleness() -> None:
    fresh = lease_body(LeaseSettings("b", "ns", duration=60), "bbbb", 3, 2, T0)
    old = lease_body(LeaseSettings("a", "ns", duration=60), "aaaa", 9, 2, T0 - 61)
    rows = replica_rows([fresh, old], T0 + 1)
    assert [(r.name, r.replica, r.keys, r.links, r.stale) for r in rows] == [
        ("a", "aaaa", 9, 2, True), ("b", "bbbb", 3, 2, False)]
    assert abs(rows[1].age - 1) < 1e-3
    broken: dict[str, Any] = {"metadata": {"name": "c", "annotations": {"wirekube.io/relay-keys": "x"}}, "spec": {}}
    [row] = replica_rows([broken], T0)
    assert (row.keys, row.stale) == (0, True)


def test_status_table_and_json_list_the_replicas() -> None:
    leases = [lease_body(LeaseSettings("relay-1", "wk", duration=60), "aaaa", 5, 1, T0 - 3),
              lease_body(LeaseSettings("relay-2", "wk", duration=60), "bbbb", 2, 1, T0 - 100)]
    report = build_report([], relay_leases=leases, now=T0)
    text = render_table(report)
    assert "RELAY-REPLICA" in text
    line1 = next(line for line in text.splitlines() if line.startswith("relay-1"))
    assert line1.split()[:5] == ["relay-1", "wk", "aaaa", "5", "1"] and "3s ago" in line1 and "stale" not in line1
    line2 = next(line for line in text.splitlines() if line.startswith("relay-2"))
    assert "(stale)" in line2
    assert '"keys": 5' in render_json(report)
    assert "not shown" in render_table(build_report([], relay_note="not shown (forbidden)"))


def test_publisher_writes_on_change_at_most_every_min_interval_and_renews() -> None:
    counts = [(1, 1)]
    pub = LeasePublisher(None, LeaseSettings("r", "ns", renew_interval=20, min_interval=5), "r1", lambda: counts[0])
    assert pub.due(T0)  # never written
    pub._written, pub._written_at = (1, 1), T0
    assert not pub.due(T0 + 1)
    counts[0] = (2, 1)
    assert not pub.due(T0 + 4.9)  # changed, but rate-limited
    assert pub.due(T0 + 5)
    counts[0] = (1, 1)
    assert not pub.due(T0 + 19.9)
    assert pub.due(T0 + 20)  # renewal


def test_a_bad_lease_name_is_one_usage_error() -> None:
    import pytest

    from wirekube.relay.cli import UsageError, build_parser, settings_from_args

    with pytest.raises(UsageError, match="--status-lease 'Relay_1': not a valid object name"):
        settings_from_args(build_parser().parse_args(["--status-lease", "Relay_1"]))
    assert settings_from_args(build_parser().parse_args(["--status-lease", "wk-relay-7d9f-abcde"])).status_lease


class FakeKube:
    """Records calls; a Lease ``existing`` already exists (left by an earlier process of the pod)."""

    def __init__(self, existing: bool) -> None:
        from wirekube import errors

        self.errors = errors
        self.calls: list[str] = []
        self.version = 7 if existing else 0
        self.conflict_next = False

    def create(self, _res: Any, body: dict[str, Any], _ns: str) -> dict[str, Any]:
        self.calls.append("create")
        if self.version:
            raise self.errors.AlreadyExists("exists")
        self.version = 1
        return {"metadata": {"resourceVersion": "1"}}

    def get(self, _res: Any, _name: str, _ns: str) -> dict[str, Any]:
        self.calls.append("get")
        return {"metadata": {"resourceVersion": str(self.version)}}

    def replace(self, _res: Any, body: dict[str, Any], _ns: str) -> dict[str, Any]:
        self.calls.append("replace")
        if self.conflict_next or body["metadata"]["resourceVersion"] != str(self.version):
            self.conflict_next = False
            raise self.errors.Conflict("conflict")
        self.version += 1
        return {"metadata": {"resourceVersion": str(self.version)}}


def test_publisher_takes_over_a_leftover_lease_and_recovers_from_a_conflict() -> None:
    import asyncio

    kube = FakeKube(existing=True)
    pub = LeasePublisher(kube, LeaseSettings("r", "ns"), "r1", lambda: (1, None))

    async def scenario() -> None:
        await pub.write_once()  # AlreadyExists: read its version, then replace
        assert kube.calls == ["create", "get", "replace"] and pub.writes == 1
        await pub.write_once()  # known version: one replace
        assert kube.calls[3:] == ["replace"] and pub.writes == 2
        kube.conflict_next = True
        await pub.write_once()  # someone else wrote: counted as a failure, started over next time
        assert pub.failures == 1 and pub.writes == 2
        await pub.write_once()
        assert kube.calls[-3:] == ["create", "get", "replace"] and pub.writes == 3

    asyncio.run(scenario())
