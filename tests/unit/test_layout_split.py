"""Issue 20's layout: which status field goes where, pair signals both ways, readers' overlay."""

from __future__ import annotations

import json

import pytest

from wirekube import models, reports
from wirekube.errors import InvalidObject
from wirekube.models import BirthdayRound, Peer, PeerSpec, PeerStatus, Transport, TransportMode

KEY = "A" * 43 + "="
ROUND = BirthdayRound(2, "2026-12-07T16:00:05.000Z", 40000, 40511)


def full_status(n: int) -> PeerStatus:
    names = [f"node-{i:05d}" for i in range(n)]
    return PeerStatus(connected=True, transport_mode=TransportMode.MIXED,
                      peer_transports={x: Transport.RELAY if i % 3 == 0 else Transport.DIRECT
                                       for i, x in enumerate(names)},
                      relay_reasons={x: "peer symmetric and local port-restricted-cone" for x in names[::3]},
                      path_mtu={names[1]: 1360}, last_handshake="2026-12-07T16:00:00Z",
                      observed_endpoints={names[1]: "198.51.100.7:40000"}, birthday={names[2]: ROUND},
                      host_endpoints=("10.0.0.5:51820",))


def test_the_peer_object_is_the_same_size_at_any_mesh_size() -> None:
    small = json.dumps(models.peer_facts_to_cr(full_status(10)))
    large = json.dumps(models.peer_facts_to_cr(full_status(5000)))
    assert small == large and len(large) < 400
    assert not set(models.peer_facts_to_cr(full_status(10))) & set(models.PAIR_FIELDS)


def test_report_holds_every_pair_and_signals_the_pair_coordination() -> None:
    status = full_status(5)
    report = models.report_status_to_cr(status)
    assert set(report) == {"transportMode", "peerTransports", "relayReasons", "pathMTU", "lastHandshake",
                           "natPortStep"}
    assert report["peerTransports"]["node-00000"] == "relay" and report["pathMTU"] == {"node-00001": 1360}
    assert models.pair_signal_specs(status) == {
        "node-00001": {"observedEndpoint": "198.51.100.7:40000"},
        "node-00002": {"birthday": {"round": 2, "notBefore": "2026-12-07T16:00:05.000Z",
                                    "portMin": 40000, "portMax": 40511}}}


def test_a_signal_reaches_the_addressee_as_the_senders_status_entry() -> None:
    body = models.pair_signal_body("a", "b", {"observedEndpoint": "198.51.100.7:40000",
                                              "birthday": {"round": 2, "notBefore": "2026-12-07T16:00:05.000Z",
                                                           "portMin": 40000, "portMax": 40511}})
    assert body["metadata"] == {"name": "a.b", "labels": {"wirekube.io/from": "a", "wirekube.io/to": "b"}}
    sig = models.pair_signal_from_cr(body)
    peer = models.with_signal(Peer("a", PeerSpec(KEY)), sig)
    assert peer.status.observed_endpoints == {"b": "198.51.100.7:40000"} and peer.status.birthday == {"b": ROUND}


@pytest.mark.parametrize("spec, field", [
    ({"observedEndpoint": "not an endpoint"}, "spec.observedEndpoint"),
    ({"birthday": {"round": 1, "notBefore": "yesterday"}}, "spec.birthday.notBefore"),
    ({"birthday": {"notBefore": "2026-12-07T16:00:05Z"}}, "spec.birthday.round"),
])
def test_a_malformed_signal_is_named_exactly(spec: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidObject, match=field.replace(".", r"\.")):
        models.pair_signal_from_cr(models.pair_signal_body("a", "b", spec))
    unlabelled = models.pair_signal_body("a", "b", {})
    del unlabelled["metadata"]["labels"]
    with pytest.raises(InvalidObject, match=r"wirekube.io/from and wirekube.io/to are required"):
        models.pair_signal_from_cr(unlabelled)


def test_conditions_go_to_the_report_and_readers_see_them_on_the_peer() -> None:
    """A relay outage's RelayUnreachable (its message names every relay address) must not reach
    every agent: the agent's conditions are on its report, and readers see them folded in."""
    unreachable = {"type": "RelayUnreachable", "status": "True", "reason": "Unreachable",
                   "message": "tcp://198.51.100.10:8443: [Errno 111] Connection refused; " * 2,
                   "lastTransitionTime": "2026-12-07T16:00:00Z", "observedGeneration": 0}
    status = PeerStatus(connected=True, conditions=(unreachable,))
    assert "conditions" not in models.peer_facts_to_cr(status)
    assert models.report_status_to_cr(status)["conditions"] == [unreachable]
    assert "conditions" not in models.report_status_to_cr(PeerStatus(connected=True))  # none: none written
    peer = {"metadata": {"name": "a"}, "status": models.peer_facts_to_cr(status)}
    report = {"metadata": {"name": "a"}, "status": models.report_status_to_cr(status)}
    assert models.overlay_report(peer, report)["status"]["conditions"] == [unreachable]


def test_readers_get_the_v1alpha1_shape_and_an_old_agents_peer_stands() -> None:
    peer = {"metadata": {"name": "a"}, "status": {"connected": True}}
    report = {"metadata": {"name": "a"}, "status": models.report_status_to_cr(full_status(3))}
    signal = models.pair_signal_body("a", "node-00001", {"observedEndpoint": "198.51.100.7:40000"})
    merged = reports.fold_signals(models.overlay_report(peer, report), [signal])["status"]
    assert merged["connected"] is True and merged["peerTransports"]["node-00000"] == "relay"
    assert merged["observedEndpoints"] == {"node-00001": "198.51.100.7:40000"}
    old = {"metadata": {"name": "o"}, "status": {"peerTransports": {"a": "direct"}}}
    assert reports.fold_signals(models.overlay_report(old, None), [])["status"]["peerTransports"] == {"a": "direct"}


def test_observations_come_from_a_few_witnesses_per_subject_in_a_large_mesh() -> None:
    names = [f"node-{i:05d}" for i in range(5000)]
    counts = [sum(models.is_witness(subject, o, len(names)) for o in names if o != subject) for subject in names[:200]]
    assert 10 <= sum(counts) / len(counts) <= 40 and min(counts) >= 5, (min(counts), sum(counts) / len(counts))
    assert all(models.is_witness("a", o, 20) for o in names[:20])  # small meshes: every observer
    many = PeerStatus(observed_endpoints={n: "198.51.100.7:40000" for n in names[:1000]})
    sent = models.pair_signal_specs(many, "node-04999", 5000)
    assert 0 < len(sent) < 60, len(sent)


def test_a_symmetric_nats_new_port_alone_does_not_move_the_published_endpoint() -> None:
    from wirekube.agent.main import sticky_symmetric_endpoint
    from wirekube.models import Endpoint, NatType

    own = {"spec": {"endpoint": "198.51.100.5:40001"}}
    moved = Endpoint.parse("198.51.100.5:52777")
    assert str(sticky_symmetric_endpoint(moved, NatType.SYMMETRIC, own)) == "198.51.100.5:40001"
    assert sticky_symmetric_endpoint(moved, NatType.PORT_RESTRICTED_CONE, own) == moved  # cone: its port is real
    elsewhere = Endpoint.parse("203.0.113.9:40001")
    assert sticky_symmetric_endpoint(elsewhere, NatType.SYMMETRIC, own) == elsewhere  # a new address is news
    assert sticky_symmetric_endpoint(moved, NatType.SYMMETRIC, None) == moved
