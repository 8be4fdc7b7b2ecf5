"""Every console script on bad input or an unreachable dependency: one clear line, no traceback.

Each case runs the installed console script (``[project.scripts]`` in python/pyproject.toml) as
a user would and checks: a non-zero exit (2 for usage errors), no "Traceback" anywhere, and a
last stderr line that starts with the program's name and names what is wrong.  Nothing here
needs root, network namespaces or an API server: the "unreachable API server" is a kubeconfig
pointing at a loopback port nobody listens on.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The wheel's console scripts, and the lab's command, which `make setup` writes for a checkout (the
# lab is not in the wheel).
SCRIPTS = set(tomllib.loads((ROOT / "python" / "pyproject.toml").read_text())["project"]["scripts"]) | {"wirekube-lab"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("badinput")
    with socket.socket() as s:  # a loopback port that is free now: nothing answers there
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    unreachable = tmp / "unreachable.kubeconfig"
    unreachable.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{dead_port}', "
        "insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    not_kubeconfig = tmp / "notes.txt"
    not_kubeconfig.write_text("just some words\n")
    bad_yaml = tmp / "broken.yaml"
    bad_yaml.write_text("sites: [unclosed\n")
    bad_topology = tmp / "topology.yaml"
    bad_topology.write_text("sites: 3\n")
    bad_key = tmp / "badkey"
    bad_key.mkdir()
    (bad_key / "private.key").write_text("not a key\n")
    dir_key = tmp / "dirkey"
    (dir_key / "private.key").mkdir(parents=True)
    busy = socket.socket()  # a port in use, for a relay that cannot bind
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    served = socket.socket(socket.AF_UNIX)  # a relay-path socket somebody already serves
    served.bind(str(tmp / "served.sock"))
    served.listen(1)
    try:
        yield {"unreachable": str(unreachable), "not_kubeconfig": str(not_kubeconfig), "bad_yaml": str(bad_yaml),
               "bad_topology": str(bad_topology), "bad_key": str(bad_key), "dir_key": str(dir_key),
               "state": str(tmp / "state"), "busy": f"127.0.0.1:{busy.getsockname()[1]}",
               "served": str(tmp / "served.sock")}
    finally:
        busy.close()
        served.close()


# (script, argv with {placeholders} from `files`, expected exit code, words the last line must hold)
CASES = [
    ("wirekube-lab", ["up", "no-such"], 2, ["no-such", "default", "eks-hybrid"]),
    ("wirekube-lab", ["up", "/nonexistent/topology.yaml"], 2, ["/nonexistent/topology.yaml", "eks-hybrid"]),
    ("wirekube-lab", ["up", "/"], 2, ["not a file"]),
    ("wirekube-lab", ["up", "{bad_yaml}"], 2, ["not valid YAML"]),
    ("wirekube-lab", ["up", "{bad_topology}"], 2, ["sites", "must be a list"]),
    ("wirekube-lab", ["status", "--name", "no-such-lab-21"], 1, ["no-such-lab-21", "is not up"]),
    ("wirekube-lab", ["status", "--name", "Bad.Name"], 2, ["--name", "Bad.Name"]),
    ("wirekube-lab", ["up", "--wait", "soon"], 2, ["--wait", "soon"]),
    ("wirekube-lab", ["nonsense"], 2, ["invalid choice"]),
    ("wirekubectl", ["--kubeconfig", "/nonexistent/kubeconfig", "status"], 1,
     ["/nonexistent/kubeconfig", "no such file"]),
    ("wirekubectl", ["--kubeconfig", "{not_kubeconfig}", "status"], 1, ["not a kubeconfig"]),
    ("wirekubectl", ["--kubeconfig", "{unreachable}", "status"], 1, ["API server unreachable"]),
    ("wirekubectl", ["--kubeconfig", "{unreachable}", "doctor"], 1, ["API server unreachable"]),
    ("wirekubectl", ["status", "-o", "xml"], 2, ["-o", "xml"]),
    ("wirekube-agent", ["--once"], 2, ["--node-name"]),
    ("wirekube-agent", ["--node-name", "n1", "--log-level", "NOPE", "--once"], 1, ["log level", "NOPE"]),
    ("wirekube-agent", ["--node-name", "n1", "--state-dir", "{state}", "--kubeconfig", "/nonexistent/kubeconfig",
                        "--once", "--log-format", "text"], 1, ["/nonexistent/kubeconfig", "no such file"]),
    ("wirekube-agent", ["--node-name", "n1", "--state-dir", "{bad_key}", "--kubeconfig", "{unreachable}", "--once",
                        "--log-format", "text"], 1, ["private.key", "cannot use the stored private key"]),
    ("wirekube-agent", ["--node-name", "n1", "--state-dir", "{dir_key}", "--kubeconfig", "{unreachable}", "--once",
                        "--log-format", "text"], 1, ["private.key", "cannot use the stored private key"]),
    ("wirekube-relay", ["--listen", "bad"], 2, ["--listen", "bad"]),
    ("wirekube-relay", ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-level", "NOPE"], 1,
     ["log level", "NOPE"]),
    ("wirekube-relay", ["--listen", "{busy}", "--stun-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                        "--log-format", "text"], 1, ["cannot start the relay", "in use"]),
    ("wirekube-relay", ["--authorize-peers", "--kubeconfig", "/nonexistent/kubeconfig", "--listen", "127.0.0.1:0",
                        "--stun-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "text"],
     2, ["/nonexistent/kubeconfig", "no such file"]),
    ("wirekube-relaypath", [], 2, ["--socket"]),
    ("wirekube-relaypath", ["--socket", "{served}"], 1, ["{served}", "already served by pid"]),
    ("wirekube-relaypath", ["--socket", "/nonexistent/dir/relaypath.sock"], 1, ["No such file"]),
    ("wirekube-gateway", ["--bogus"], 2, ["--bogus"]),
    ("wirekube-gateway", ["--kubeconfig", "/nonexistent/kubeconfig"], 1, ["/nonexistent/kubeconfig", "no such file"]),
    ("wirekube-gateway", ["--kubeconfig", "{not_kubeconfig}"], 1, ["not a kubeconfig"]),
    ("wirekube-gateway", ["--kubeconfig", "/nonexistent/kubeconfig", "--log-level", "NOPE"], 1, ["log level"]),
]


def test_every_console_script_is_covered() -> None:
    assert {script for script, *_ in CASES} == SCRIPTS


@pytest.mark.parametrize(("script", "argv", "code", "words"), CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}"[:80] for c in CASES])
def test_bad_input_ends_in_one_clear_line(files: dict[str, str], script: str, argv: list[str], code: int,
                                          words: list[str]) -> None:
    args = [a.format(**files) for a in argv]
    done = subprocess.run([str(BIN / script), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    assert done.returncode == code, (done.returncode, output[-2000:])
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    # The error line: "PROG: ...", argparse's "PROG SUBCOMMAND: error: ...", or a daemon's ERROR log line.
    said = [i for i, ln in enumerate(lines) if ln.startswith(script) or " ERROR " in ln]
    assert said, f"{script} exited {done.returncode} without a line saying why: {done.stderr[-2000:]!r}"
    error = lines[said[-1]]
    # One line, except that a topology file's problems follow it one per line (README).
    extra = lines[said[-1] + 1:]
    assert all(ln.startswith("  ") for ln in extra) and ("problem" in error or not extra), done.stderr
    text = "\n".join([error, *extra])
    missing = [w.format(**files) for w in words if w.format(**files) not in text]
    assert not missing, f"{missing} not in the error: {text!r}"


def test_topologies_lists_each_built_in_on_one_line() -> None:
    from wirekube.lab.topology import BUILTIN_TOPOLOGIES

    done = subprocess.run([str(BIN / "wirekube-lab"), "topologies"], capture_output=True, text=True, timeout=60,
                          check=True)
    lines = done.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == list(BUILTIN_TOPOLOGIES)
    assert all(len(ln.split()) > 3 for ln in lines), lines  # each has a description


def test_up_no_such_prints_exactly_one_line_naming_the_built_ins() -> None:
    done = subprocess.run([str(BIN / "wirekube-lab"), "up", "no-such"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert all(name in done.stderr for name in ("default", "eks-hybrid")), done.stderr
