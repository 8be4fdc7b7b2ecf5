"""A real HTTP CONNECT proxy for the lab and the tests: Debian's squid, configured like a strict
corporate proxy (CONNECT only, only to port 443, Basic auth from a password file).

Only the files are made here; the caller runs ``squid -N -f CONF`` in the foreground inside its
own network namespace and supervises it by PID (:func:`squid_argv`).  The access log is what
tests read to see the tunnel (:func:`access_log_lines`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SQUID = "/usr/sbin/squid"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
SQUID_USER = "proxy"


@dataclass(frozen=True)
class SquidFiles:
    directory: Path
    config: Path
    access_log: Path
    cache_log: Path


def squid_available() -> str | None:
    """None when squid can run here, else why not (for a skip reason)."""
    if not os.path.exists(SQUID) or not os.path.exists(NCSA_AUTH):
        return "squid is not installed (apt-get install squid)"
    if shutil.which("openssl") is None:
        return "openssl is not installed (needed for the proxy's password file)"
    try:
        pwd.getpwnam(SQUID_USER)
    except KeyError:
        return f"no user {SQUID_USER!r} for squid to run as"
    return None


def write_squid(directory: Path, listen: str, users: dict[str, str], *, connect_ports: tuple[int, ...] = (443,)
                ) -> SquidFiles:
    """Config, password file and log directory for one squid listening on ``listen``
    (``host:port``): CONNECT to ``connect_ports`` only, for the ``users`` (name: password) only,
    nothing cached, everything else refused."""
    directory.mkdir(parents=True, exist_ok=True)
    passwd = directory / "passwd"
    lines = []
    for name, password in users.items():
        hashed = subprocess.run(["openssl", "passwd", "-apr1", "-stdin"], input=password, capture_output=True,
                                text=True, check=True).stdout.strip()
        lines.append(f"{name}:{hashed}\n")
    passwd.write_text("".join(lines))
    files = SquidFiles(directory, directory / "squid.conf", directory / "access.log", directory / "cache.log")
    ports = " ".join(str(p) for p in connect_ports)
    files.config.write_text(f"""\
# written by wirekube.lab.squid: a strict corporate proxy (CONNECT to {ports} only, Basic auth)
http_port {listen}
pid_filename none
cache deny all
cache_mem 8 MB
coredump_dir {directory}
cache_log {files.cache_log}
access_log stdio:{files.access_log}
logfile_rotate 0
shutdown_lifetime 1 seconds
visible_hostname wirekube-lab-proxy
pinger_enable off
dns_nameservers 127.0.0.1
cache_effective_user {SQUID_USER}
auth_param basic program {NCSA_AUTH} {passwd}
auth_param basic children 2 startup=1 idle=1
auth_param basic realm wirekube-lab
acl authenticated proxy_auth REQUIRED
acl tunnel_ports port {ports}
acl CONNECT method CONNECT
http_access deny !CONNECT
http_access deny !tunnel_ports
http_access allow authenticated
http_access deny all
""")
    user = pwd.getpwnam(SQUID_USER)
    for path in (directory, passwd, files.config):
        os.chown(path, user.pw_uid, user.pw_gid)
    directory.chmod(0o750)
    passwd.chmod(0o640)
    return files


def squid_argv(files: SquidFiles) -> list[str]:
    """Foreground, no daemon fork, errors to stderr."""
    return [SQUID, "-N", "-d", "1", "-f", str(files.config)]


def access_log_lines(files: SquidFiles) -> list[str]:
    try:
        return files.access_log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
