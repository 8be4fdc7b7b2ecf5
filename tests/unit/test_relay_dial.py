"""Relay URLs and HTTP proxy settings (issue 19): pure parsing, exact errors, no secret shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from wirekube.relay.dial import Proxy, ProxyConfig
from wirekube.relay.url import RelayURL


@pytest.mark.parametrize(("text", "want"), [
    ("relay.example:3478", RelayURL("tcp", "relay.example", 3478)),
    ("tcp://198.18.0.2:3478", RelayURL("tcp", "198.18.0.2", 3478)),
    ("[2001:db8::1]:3478", RelayURL("tcp", "2001:db8::1", 3478)),
    ("wss://relay.example", RelayURL("wss", "relay.example", 443, "/")),
    ("wss://relay.example:8443/wirekube/relay", RelayURL("wss", "relay.example", 8443, "/wirekube/relay")),
    ("WSS://Relay.Example/r?x=1", RelayURL("wss", "relay.example", 443, "/r?x=1")),
])
def test_relay_urls_parse(text: str, want: RelayURL) -> None:
    assert RelayURL.parse(text) == want
    assert RelayURL.parse(str(want)) == want


@pytest.mark.parametrize(("text", "error"), [
    ("relay.example", "must be host:port"),
    ("tcp://relay.example", "tcp:// needs a port"),
    ("tcp://relay.example:3478/path", "tcp:// takes no path"),
    ("https://relay.example", "scheme must be tcp or wss"),
    ("wss://user:secret@relay.example/", "carries no credentials"),
    ("wss://relay.example:99999/", "bad port"),
    ("relay.example:0", "between 1 and 65535"),
])
def test_bad_relay_urls_say_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as e:
        RelayURL.parse(text)
    assert "secret" not in str(e.value)


def test_proxy_from_env_with_no_proxy_names_suffixes_and_cidrs() -> None:
    config = ProxyConfig.from_env({"HTTPS_PROXY": "http://proxy.corp:8080",
                                   "NO_PROXY": "localhost, .svc,cluster.local,10.0.0.0/8,relay.corp:443"})
    assert config.proxy == Proxy("proxy.corp", 8080)
    for bypassed in ("localhost", "wirekube-relay.wirekube-system.svc", "a.cluster.local", "10.1.2.3", "relay.corp"):
        assert config.for_host(bypassed) is None, bypassed
    for proxied in ("198.18.0.2", "relay.example", "notcluster.local.example", "11.0.0.1"):
        assert config.for_host(proxied) == config.proxy, proxied
    assert ProxyConfig.from_env({"https_proxy": "proxy:3128", "no_proxy": "*"}).for_host("anything") is None
    assert ProxyConfig.from_env({}).for_host("relay.example") is None


def test_proxy_credentials_never_show() -> None:
    proxy = Proxy.parse("http://alice:s3cr%40t@proxy.corp")
    assert (proxy.username, proxy.password, proxy.port) == ("alice", "s3cr@t", 3128)
    assert "s3cr" not in repr(proxy) and "s3cr" not in str(proxy) and "alice" not in str(proxy)
    assert "s3cr" not in repr(ProxyConfig(proxy))
    other = proxy.with_credentials("bob:p:w\n")
    assert (other.username, other.password) == ("bob", "p:w")
    with pytest.raises(ValueError, match="user:password"):
        proxy.with_credentials("no-colon")


@pytest.mark.parametrize(("value", "error"), [
    ("https://proxy.corp:3128", "HTTPS_PROXY: proxy scheme must be http"),
    ("http://proxy.corp:bad", "HTTPS_PROXY: proxy URL has a bad port"),
])
def test_bad_proxy_urls_name_the_variable(value: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ProxyConfig.from_env({"HTTPS_PROXY": value})


@pytest.mark.parametrize(("env", "argv", "error"), [
    ({"HTTPS_PROXY": "https://proxy:3128"}, [], "HTTPS_PROXY: proxy scheme must be http"),
    ({}, ["--relay-proxy-credentials-file", "{tmp}/creds"], "--relay-proxy-credentials-file needs HTTPS_PROXY"),
    ({"HTTPS_PROXY": "proxy:3128"}, ["--relay-proxy-credentials-file", "{tmp}/missing"], "No such file or directory"),
    ({"HTTPS_PROXY": "proxy:3128"}, ["--relay-proxy-credentials-file", "{tmp}/creds"], "must be user:password"),
    ({}, ["--relay-ca-file", "{tmp}/missing.pem"], "cannot be read"),
])
def test_the_agent_refuses_unusable_proxy_settings_in_one_line(
        env: dict[str, str], argv: list[str], error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from wirekube.agent.main import parse_args

    (tmp_path / "creds").write_text("no-colon-here\n")
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=r"^2$") as exited:  # argparse: usage error
        parse_args(["--node-name", "n1", *(a.format(tmp=tmp_path) for a in argv)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and last.startswith("wirekube-agent: error: ") and error in last


def test_the_agent_takes_proxy_credentials_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wirekube.agent.main import parse_args

    (tmp_path / "creds").write_text("alice:s3cret\n")
    monkeypatch.setenv("HTTPS_PROXY", "http://old:old@proxy.corp:8080")
    monkeypatch.setenv("NO_PROXY", ".svc")
    settings = parse_args(["--node-name", "n1", "--relay-proxy-credentials-file", str(tmp_path / "creds")])
    proxy = settings.relay_proxy.for_host("relay.example")
    assert proxy is not None and (proxy.host, proxy.port, proxy.username, proxy.password) == (
        "proxy.corp", 8080, "alice", "s3cret")
    assert settings.relay_proxy.for_host("wirekube-relay.wirekube-system.svc") is None
    assert "s3cret" not in repr(settings)
