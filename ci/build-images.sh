#!/usr/bin/env bash
# Build the three WireKube images (agent, relay, gateway) from images/*/Dockerfile with buildah,
# without a registry, into ~/.cache/wirekube/images:
#   wirekube-<name>.tar      docker-archive (`ctr -n k8s.io images import`, `docker load`)
#   wirekube-<name>.digest   the image's manifest digest (sha256:...) as built
#   wirekube-<name>.ref      the reference inside the archive (ghcr.io/wirekube/wirekube-<name>:<tag>)
#   images.env               NAME_REF/NAME_DIGEST lines for the lab and the tests
#
# The Dockerfiles are built unchanged in what they install: their base image is an ARG whose
# default is the real python:3.11.14-slim-bookworm (so `docker build` on a laptop uses it); here
# no registry is reachable, so the base is a Debian bookworm rootfs made with mmdebstrap
# (python3.11 with a venv at /usr/local, which puts python and pip on PATH like python:slim),
# committed as localhost/wirekube-base and passed as BASE.
#
# Cached and incremental: the base is rebuilt only when its recipe changes, an image only when its
# Dockerfile, the python/ tree it copies, or the base changes (inputs hashed into a .inputs file).
# The tag is derived from that hash (lab-<12 hex>), so a changed build is a changed reference.
#
# pip inside a build needs the host's CA bundle (egress may go through a TLS-inspecting proxy): it
# is bind-mounted read-only, for the RUN steps only, over the base's own CA bundle, which
# Debian's pip reads (a path that exists, so no mount-point stub lands in a layer;
# ci/check-images.py --built checks that the image keeps its own bundle and no stub).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE="${WIREKUBE_CACHE:-$HOME/.cache/wirekube}"
OUT="$CACHE/images"
STORAGE="$CACHE/containers"
mkdir -p "$OUT" "$STORAGE"
BUILDAH=(buildah --root "$STORAGE/storage" --runroot "$STORAGE/run")
BASE_REF=localhost/wirekube-base:bookworm-py3.11
IMAGES=(agent relay gateway)
MIRROR="${WIREKUBE_DEBIAN_MIRROR:-http://deb.debian.org}"
say() { printf '[build-images] %s\n' "$*" >&2; }

for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "build-images: $tool is not installed (run make setup)" >&2; exit 1; }
done

# -- 1. the base image ---------------------------------------------------------------------------
BASE_RECIPE="v1 bookworm python3.11,python3.11-venv,ca-certificates venv=/usr/local mirror=$MIRROR"
base_stamp="$OUT/base.inputs"
rootfs="$OUT/base-rootfs.tar"
if [[ "$(cat "$rootfs.inputs" 2>/dev/null)" != "$BASE_RECIPE" || ! -s "$rootfs" ]]; then
  say "base: mmdebstrap bookworm with python3.11 (about 1-7 min, depending on the mirror)"
  t0=$SECONDS
  mmdebstrap --quiet --variant=apt --include=python3.11,python3.11-venv,ca-certificates \
    --customize-hook='chroot "$1" python3.11 -m venv /usr/local' \
    bookworm "$rootfs.tmp" \
    "deb $MIRROR/debian bookworm main" "deb $MIRROR/debian bookworm-updates main" \
    "deb $MIRROR/debian-security bookworm-security main"
  mv "$rootfs.tmp" "$rootfs"
  echo "$BASE_RECIPE" > "$rootfs.inputs"
  say "base: rootfs made in $((SECONDS - t0)) s"
fi
if [[ "$(cat "$base_stamp" 2>/dev/null)" != "$BASE_RECIPE" ]] || ! "${BUILDAH[@]}" inspect --type image "$BASE_REF" >/dev/null 2>&1; then
  ctr=$("${BUILDAH[@]}" from scratch)
  trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
  "${BUILDAH[@]}" add "$ctr" "$rootfs" / >/dev/null
  "${BUILDAH[@]}" config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$BASE_REF" >/dev/null
  trap - EXIT
  echo "$BASE_RECIPE" > "$base_stamp"
  say "base: $BASE_REF committed"
else
  say "base: $BASE_REF cached"
fi
base_id=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$BASE_REF")

# -- 2. the three images ---------------------------------------------------------------------------
# The hash of what a build reads: its Dockerfile, the files COPY python/ takes (honouring
# .dockerignore's exclusions: caches, build output, egg-info, the lab), and the base image.
inputs_hash() {  # image
  python3 - "$1" "$base_id" <<'PY'
import hashlib, os, sys
image, base = sys.argv[1], sys.argv[2]
h = hashlib.sha256(f"v2 {image} {base}\n".encode())
h.update(open(f"images/{image}/Dockerfile", "rb").read())
skip_dirs = {"__pycache__", ".mypy_cache", ".pytest_cache", ".hypothesis"}
for top, dirs, files in os.walk("python"):
    dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.endswith(".egg-info")
                     and not (top == "python" and d in ("build", "dist"))
                     and not (top == os.path.join("python", "wirekube") and d == "lab"))
    for f in sorted(files):
        if f.endswith((".pyc", ".pyo")):
            continue
        p = os.path.join(top, f)
        h.update(p.encode() + b"\0" + open(p, "rb").read() + b"\0")
print(h.hexdigest())
PY
}

CA_BUNDLE="${WIREKUBE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PIP_CA=/etc/ssl/certs/ca-certificates.crt  # the base image's own bundle (Debian's pip reads it)

env_lines=()
n=0
for image in "${IMAGES[@]}"; do
  n=$((n + 1))
  hash=$(inputs_hash "$image")
  tag="lab-${hash:0:12}"
  ref="ghcr.io/wirekube/wirekube-$image:$tag"
  archive="$OUT/wirekube-$image.tar"
  if [[ "$(cat "$OUT/wirekube-$image.inputs" 2>/dev/null)" == "$hash" && -s "$archive" && -s "$OUT/wirekube-$image.digest" ]]; then
    say "$n/${#IMAGES[@]} $image: unchanged ($ref)"
  else
    say "$n/${#IMAGES[@]} $image: building $ref (about 1-3 min)"
    t0=$SECONDS
    log="$OUT/wirekube-$image.build.log"
    mounts=()
    [[ -f "$CA_BUNDLE" ]] && mounts+=(-v "$CA_BUNDLE:$PIP_CA:ro")
    if ! "${BUILDAH[@]}" bud --quiet --pull=never --network=host --layers=false --format docker \
          --build-arg "BASE=$BASE_REF" ${mounts[@]+"${mounts[@]}"} \
          -f "images/$image/Dockerfile" -t "$ref" "$ROOT" >"$log" 2>&1; then
      tail -20 "$log" >&2
      echo "build-images: building $image failed; full log: $log" >&2
      exit 1
    fi
    rm -f "$archive.tmp"
    "${BUILDAH[@]}" push --quiet "$ref" "docker-archive:$archive.tmp:$ref" >>"$log" 2>&1
    mv "$archive.tmp" "$archive"
    "${BUILDAH[@]}" inspect --type image --format '{{.FromImageDigest}}' "$ref" > "$OUT/wirekube-$image.digest"
    echo "$ref" > "$OUT/wirekube-$image.ref"
    echo "$hash" > "$OUT/wirekube-$image.inputs"
    # Keep only the current build of this image in buildah's store.
    "${BUILDAH[@]}" images --noheading --format '{{.Name}}:{{.Tag}}' \
      | grep -E "^ghcr.io/wirekube/wirekube-$image:" | grep -vxF "$ref" \
      | xargs -r "${BUILDAH[@]}" rmi >/dev/null 2>&1 || true
    say "$n/${#IMAGES[@]} $image: built in $((SECONDS - t0)) s, $(du -m "$archive" | cut -f1) MB, $(cat "$OUT/wirekube-$image.digest")"
  fi
  upper=$(tr 'a-z' 'A-Z' <<<"$image")
  env_lines+=("${upper}_REF=$(cat "$OUT/wirekube-$image.ref")" "${upper}_DIGEST=$(cat "$OUT/wirekube-$image.digest")"
              "${upper}_ARCHIVE=$archive")
done
# -- 3. the pod sandbox ("pause") image -------------------------------------------------------------
# containerd needs a sandbox image and no registry is reachable: a static Go binary that waits for
# SIGTERM/SIGINT and reaps orphans, in an image from scratch.
PAUSE_REF=localhost/wirekube-pause:1
pause_archive="$OUT/wirekube-pause.tar"
if [[ ! -s "$pause_archive" ]]; then
  say "pause: building $PAUSE_REF"
  src=$(mktemp -d)
  cat > "$src/main.go" <<'GO'
// The pod sandbox: holds the pod's namespaces, reaps orphans, exits on SIGTERM/SIGINT.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
GO
  printf 'module pause\n\ngo 1.21\n' > "$src/go.mod"
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o pause .)
  ctr=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" copy --chmod 0755 "$ctr" "$src/pause" /pause >/dev/null
  "${BUILDAH[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  "${BUILDAH[@]}" commit --quiet --rm --format docker "$ctr" "$PAUSE_REF" >/dev/null
  rm -rf "$src" "$pause_archive.tmp"
  "${BUILDAH[@]}" push --quiet "$PAUSE_REF" "docker-archive:$pause_archive.tmp:$PAUSE_REF"
  mv "$pause_archive.tmp" "$pause_archive"
fi
env_lines+=("PAUSE_REF=$PAUSE_REF" "PAUSE_ARCHIVE=$pause_archive")
printf '%s\n' "${env_lines[@]}" > "$OUT/images.env"
"${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
say "images in $OUT (images.env lists references and digests)"
