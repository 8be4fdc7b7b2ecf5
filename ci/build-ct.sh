#!/usr/bin/env bash
# Build chart-testing (`ct`) from the Go module proxy into the tools cache.
# (`go install ...@version` fails here: the proxy refuses the module's version list, which go
# install needs for its deprecation check; a pinned require in a scratch module does not.)
set -euo pipefail
CT_VERSION="${WIREKUBE_CT_VERSION:-v3.14.0}"
CACHE="${WIREKUBE_CACHE:-$HOME/.cache/wirekube}"
OUT="$CACHE/tools/ct-$CT_VERSION"
if [[ ! -x "$OUT" ]]; then
  work="$CACHE/build/ct-$CT_VERSION"
  rm -rf "$work"; mkdir -p "$work" "$CACHE/tools"; cd "$work"
  printf 'module wirekube.local/ct\n\ngo 1.24\n\nrequire github.com/helm/chart-testing/v3 %s\n' "$CT_VERSION" > go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/helm/chart-testing/v3/ct"\n' > tools.go
  echo "[build-ct] compiling chart-testing $CT_VERSION" >&2
  go mod tidy >/dev/null 2>tidy.log || { cat tidy.log >&2; exit 1; }
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$OUT.tmp" github.com/helm/chart-testing/v3/ct
  mv "$OUT.tmp" "$OUT"
fi
ln -sf "$(basename "$OUT")" "$CACHE/tools/ct"
