#!/usr/bin/env python3
"""Build the wheel and check that the three Dockerfiles install it correctly.

Static checks of the Dockerfiles (always):
  - the wheel builds from python/ and declares every console script an image runs, and holds
    neither the development lab (wirekube.lab) nor its wirekube-lab command;
  - each Dockerfile pins its base image to an exact version (no :latest, no bare major tag; a
    FROM ${BASE} counts with the ARG's default, which ci/build-images.sh overrides here),
    builds the wheel from python/ in a first stage and installs only that wheel;
  - ENTRYPOINT is one of the wheel's console scripts;
  - relay and gateway run as a non-root USER; the agent image carries wireguard-go, iproute2
    and nftables;
  - an image that needs an optional dependency group of python/pyproject.toml (the gateway: `aws`,
    botocore for the VPC route follower) builds and installs the wheel with that extra, and the
    extra exists.
With --built, also the images `make images` built (ci/build-images.sh; their references in
~/.cache/wirekube/images/images.env), each mounted read-only from buildah's store:
  - the entry point runs `--help` (exit 0, prints usage) inside the image's root, as the image's
    USER, with the image's PATH and nothing from the host;
  - relay and gateway run as a non-root user, and nothing the chart's securityContext needs to
    write (read-only root filesystem; the paths the chart mounts) is missing or root-owned-only;
  - no build secret leaked into a layer (the CA bundle and pip.conf ci/build-images.sh mounts);
  - the agent image has wireguard-go, wg, ip and nft on PATH;
  - wirekube imports in each image and wirekube.lab does not.
Exit status 1 with one line per problem.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"agent": "wirekube-agent", "relay": "wirekube-relay", "gateway": "wirekube-gateway"}
EXTRAS = {"gateway": ("aws",)}
LAB_PACKAGE, LAB_SCRIPT = "wirekube/lab", "wirekube-lab"
PINNED_FROM = re.compile(r"^FROM\s+\S+:\d+\.\d+\.\d+[^\s]*(\s+AS\s+\S+)?$", re.IGNORECASE)
ARG_DEFAULT = re.compile(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)$", re.IGNORECASE)


def resolve_args(lines: list[str]) -> list[str]:
    """FROM lines with ${NAME}/$NAME replaced by the ARG's default (as a plain `docker build` does)."""
    defaults = {m.group(1): m.group(2) for m in map(ARG_DEFAULT.match, lines) if m}
    out = []
    for ln in lines:
        if ln.upper().startswith("FROM"):
            ln = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), ln)
        out.append(ln)
    return out


def build_wheel() -> tuple[set[str], list[str]]:
    """The wheel python/ builds: its console scripts and the files it holds.

    Built from a copy of python/ without what .dockerignore keeps out of an image build (a checkout's
    build/ holds the previous builds' files, which setuptools would otherwise pack again)."""
    with tempfile.TemporaryDirectory() as out:
        src = Path(out) / "python"
        shutil.copytree(ROOT / "python", src, ignore=shutil.ignore_patterns(
            "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache", ".hypothesis"))
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, str(src)],
            check=True,
        )
        wheel = next(Path(out).glob("wirekube-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            files = zf.namelist()
            name = next(n for n in files if n.endswith(".dist-info/entry_points.txt"))
            parser = configparser.ConfigParser()
            parser.read_string(zf.read(name).decode())
    return (set(parser["console_scripts"]) if parser.has_section("console_scripts") else set()), files


def check_wheel_has_no_lab(scripts: set[str], files: list[str]) -> list[str]:
    """The lab (network namespaces, qemu guests, a test API server) is a development tool: the wheel
    the images install must carry neither its package nor its command."""
    problems = [f"the wheel holds the lab: {name}" for name in files if name.startswith(LAB_PACKAGE + "/")]
    if LAB_SCRIPT in scripts:
        problems.append(f"the wheel declares the lab's console script {LAB_SCRIPT}")
    if not any(name.startswith("wirekube/agent/") for name in files):
        problems.append("the wheel holds no wirekube/agent/ (is the package list right?)")
    return problems


def pyproject_extras() -> set[str]:
    import tomllib

    data = tomllib.loads((ROOT / "python" / "pyproject.toml").read_text())
    return set(data.get("project", {}).get("optional-dependencies", {}))


def check_extras(image: str, path: Path, lines: list[str], extras: set[str]) -> list[str]:
    problems = []
    for extra in EXTRAS.get(image, ()):
        if extra not in extras:
            problems.append(f"{path}: needs the extra [{extra}], which python/pyproject.toml does not define")
        if not any("pip wheel" in ln and f"./python[{extra}]" in ln for ln in lines):
            problems.append(f"{path}: must build the wheel with its extra: pip wheel ... \"./python[{extra}]\"")
        if not any("pip install" in ln and f"wirekube[{extra}]" in ln and "/wheels" in ln for ln in lines):
            problems.append(f"{path}: must install \"wirekube[{extra}]\" from /wheels")
    return problems


def check_dockerfile(image: str, entrypoint: str, scripts: set[str], extras: set[str] | None = None) -> list[str]:
    path = ROOT / "images" / image / "Dockerfile"
    text = path.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    problems = []
    for ln in (ln for ln in resolve_args(lines) if ln.upper().startswith("FROM")):
        if not PINNED_FROM.match(ln):
            problems.append(f"{path}: base image not pinned to an exact version: {ln}")
    if "COPY python/ python/" not in lines or not any("pip wheel" in ln and "./python" in ln for ln in lines):
        problems.append(f"{path}: does not build the wheel from python/")
    if not any("pip install" in ln and "/wheels/" in ln for ln in lines):
        problems.append(f"{path}: does not install the built wheel")
    if f'ENTRYPOINT ["{entrypoint}"]' not in lines:
        problems.append(f"{path}: ENTRYPOINT is not [\"{entrypoint}\"]")
    if entrypoint not in scripts:
        problems.append(f"{path}: {entrypoint} is not a console script of the wheel ({sorted(scripts)})")
    if image == "agent":
        for pkg in ("wireguard-go", "iproute2", "nftables"):
            if pkg not in text:
                problems.append(f"{path}: the agent image must install {pkg}")
    elif not any(re.match(r"USER\s+[1-9][0-9]*(:[0-9]+)?$", ln) for ln in lines):
        problems.append(f"{path}: must run as a numeric non-root USER")
    problems.extend(check_extras(image, path, lines, pyproject_extras() if extras is None else extras))
    return problems


# ---- the built images ------------------------------------------------------------------------------

CACHE = Path(os.environ.get("WIREKUBE_CACHE", Path.home() / ".cache" / "wirekube"))
# What the chart mounts writable into each container (besides its read-only root filesystem).
CHART_WRITABLE = {"agent": ("/tmp", "/run/wireguard", "/var/lib/wirekube"), "relay": (), "gateway": ()}
AGENT_TOOLS = ("wireguard-go", "wg", "ip", "nft")
# Build-time mount points that must not be left as stubs in a layer (older ci/build-images.sh
# mounted these two), and the CA bundle pip reads, which must be the image's own, not the host's.
LEAKS = ("etc/pip.conf", "run/wirekube-build-ca.crt")
PIP_CA = "etc/ssl/certs/ca-certificates.crt"


def buildah() -> list[str]:
    return ["buildah", "--root", str(CACHE / "containers" / "storage"), "--runroot", str(CACHE / "containers" / "run")]


def images_env() -> dict[str, str]:
    path = CACHE / "images" / "images.env"
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def image_config(ref: str) -> dict[str, Any]:
    out = subprocess.run([*buildah(), "inspect", "--type", "image", ref], capture_output=True, text=True, check=True)
    config: dict[str, Any] = json.loads(out.stdout)["Docker"]["config"]
    return config


@contextlib.contextmanager
def read_only_root(mnt: Path, writable: tuple[str, ...]) -> Iterator[Path]:
    """The image's root as the chart runs it: read-only (readOnlyRootFilesystem), with a tmpfs
    on each path the chart mounts writable."""
    with tempfile.TemporaryDirectory(prefix="wirekube-image-") as tmp:
        root = Path(tmp)
        mounted = [root]
        subprocess.run(["mount", "--bind", str(mnt), str(root)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
            for path in writable:
                if (root / path.lstrip("/")).is_dir():
                    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "none", str(root / path.lstrip("/"))],
                                   check=True)
                    mounted.append(root / path.lstrip("/"))
            yield root
        finally:
            for m in reversed(mounted):
                subprocess.run(["umount", str(m)], capture_output=True, check=False)


def run_in_root(root: Path, user: str, env: list[str], argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``argv`` inside ``root`` (chroot) as ``user``, with only the image's environment."""
    userspec = user if ":" in user else f"{user}:{user}" if user else "0:0"
    return subprocess.run(["chroot", f"--userspec={userspec}", str(root), "/usr/bin/env", "-i", *env, *argv],
                          capture_output=True, text=True, timeout=120, check=False)


def check_built(image: str, ref: str) -> list[str]:
    problems: list[str] = []
    config = image_config(ref)
    entry = config.get("Entrypoint") or []
    user = config.get("User") or ""
    env = config.get("Env") or []
    ctr = subprocess.run([*buildah(), "from", "--pull=never", ref], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        mnt = Path(subprocess.run([*buildah(), "mount", ctr], capture_output=True, text=True,
                                  check=True).stdout.strip())
        if entry != [IMAGES[image]]:
            problems.append(f"{ref}: entry point {entry} is not [{IMAGES[image]!r}]")
        with read_only_root(mnt, CHART_WRITABLE[image]) as root:
            proc = run_in_root(root, user, env, [*entry, "--help"])
        if proc.returncode != 0 or "usage" not in proc.stdout.lower():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            problems.append(f"{ref}: `{' '.join(entry)} --help` as user {user or 'root'} on a read-only root "
                            f"exited {proc.returncode}: {last}")
        if image != "agent" and user.split(":")[0] in ("", "0", "root"):
            problems.append(f"{ref}: runs as root (USER {user!r})")
        for path in CHART_WRITABLE[image]:
            target = mnt / path.lstrip("/")
            if target.exists() and not target.is_dir():
                problems.append(f"{ref}: {path} (a volume of the chart) exists and is not a directory")
        for leak in LEAKS:
            if (mnt / leak).exists():
                problems.append(f"{ref}: /{leak} (a build-time mount) was left in the image")
        host_ca = Path(os.environ.get("WIREKUBE_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
        if (mnt / PIP_CA).exists() and host_ca.exists() and (mnt / PIP_CA).read_bytes() == host_ca.read_bytes():
            problems.append(f"{ref}: /{PIP_CA} is the build host's CA bundle (a build-time mount was committed)")
        lab = run_in_root(mnt, user, env, ["python3", "-c", "import wirekube.agent, wirekube.lab"])
        if lab.returncode == 0 or "No module named 'wirekube.lab'" not in lab.stderr:
            problems.append(f"{ref}: wirekube.lab is importable or wirekube is not (the lab must not ship): "
                            f"{(lab.stderr.strip().splitlines() or ['exit 0'])[-1]}")
        if image == "agent":
            for tool in AGENT_TOOLS:
                if run_in_root(mnt, user, env, ["/bin/sh", "-c", f"command -v {tool}"]).returncode != 0:
                    problems.append(f"{ref}: {tool} is not on the image's PATH")
    finally:
        subprocess.run([*buildah(), "umount", ctr], capture_output=True, check=False)
        subprocess.run([*buildah(), "rm", ctr], capture_output=True, check=False)
    return problems


def check_all_built() -> list[str]:
    env = images_env()
    if not env:
        return [f"no built images ({CACHE / 'images' / 'images.env'} is missing): run `make images`"]
    return [p for image in IMAGES for p in check_built(image, env[f"{image.upper()}_REF"])]


def main() -> int:
    scripts, files = build_wheel()
    problems = check_wheel_has_no_lab(scripts, files)
    problems += [p for image, ep in IMAGES.items() for p in check_dockerfile(image, ep, scripts)]
    built = "--built" in sys.argv[1:]
    if built:
        problems += check_all_built()
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"images ok: wheel scripts {sorted(scripts)}" + ("; built images checked" if built else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
