#!/usr/bin/env python3
"""Build the wheel and check that the three Dockerfiles install it correctly.

There is no Docker engine on the build machines, so the images are not built here; this check
keeps the Dockerfiles honest instead:
  - the wheel builds from python/ and declares every console script an image runs;
  - each Dockerfile pins its base image to an exact version (no :latest, no bare major tag),
    builds the wheel from python/ in a first stage and installs only that wheel;
  - ENTRYPOINT is one of the wheel's console scripts;
  - relay and gateway run as a non-root USER; the agent image carries wireguard-go, iproute2
    and nftables;
  - an image that needs an optional dependency group of python/pyproject.toml (the gateway: `aws`,
    botocore for the VPC route follower) builds and installs the wheel with that extra, and the
    extra exists.
Exit status 1 with one line per problem.
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"agent": "wirekube-agent", "relay": "wirekube-relay", "gateway": "wirekube-gateway"}
EXTRAS = {"gateway": ("aws",)}
PINNED_FROM = re.compile(r"^FROM\s+\S+:\d+\.\d+\.\d+[^\s]*(\s+AS\s+\S+)?$", re.IGNORECASE)


def wheel_scripts() -> set[str]:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, str(ROOT / "python")],
            check=True,
        )
        wheel = next(Path(out).glob("wirekube-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
            parser = configparser.ConfigParser()
            parser.read_string(zf.read(name).decode())
    return set(parser["console_scripts"]) if parser.has_section("console_scripts") else set()


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
    for ln in (ln for ln in lines if ln.upper().startswith("FROM")):
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


def main() -> int:
    scripts = wheel_scripts()
    problems = [p for image, ep in IMAGES.items() for p in check_dockerfile(image, ep, scripts)]
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"images ok: wheel scripts {sorted(scripts)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
