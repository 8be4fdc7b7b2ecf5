#!/usr/bin/env bash
# Build the real kube-apiserver and etcd from the Go module proxy into a cache outside the repo.
#
# Why: tests and the lab run against the genuine API server (CRD validation, CEL, admission
# policies, watch semantics), never a hand-written fake.  The build is done once per machine and
# reused; the binaries are keyed by version so a version bump rebuilds.
#
# k8s.io/kubernetes lists its k8s.io/* staging modules at v0.0.0 with replace directives into its
# own tree, which a consumer cannot use; we point each at the matching published v0.X.Y release.
set -euo pipefail

K8S_VERSION="${WIREKUBE_K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${WIREKUBE_ETCD_VERSION:-v3.6.5}"
CACHE="${WIREKUBE_CACHE:-$HOME/.cache/wirekube}"
BIN="$CACHE/bin"
STAGING_VERSION="v0.${K8S_VERSION#v1.}"

mkdir -p "$BIN"
APISERVER="$BIN/kube-apiserver-$K8S_VERSION"
ETCD="$BIN/etcd-$ETCD_VERSION"

step() { printf '[build-control-plane] %s\n' "$*" >&2; }

if [[ ! -x "$APISERVER" ]]; then
  work="$CACHE/build/kube-apiserver-$K8S_VERSION"
  rm -rf "$work"; mkdir -p "$work"; cd "$work"
  step "1/4 resolving k8s.io/kubernetes@$K8S_VERSION (staging modules -> $STAGING_VERSION)"
  modfile=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module wirekube.local/controlplane"
    echo
    grep -E '^go [0-9]' "$modfile"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    grep -E '=> \./staging/src/' "$modfile" | awk -v v="$STAGING_VERSION" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
  step "2/4 downloading kube-apiserver's module graph"
  go mod tidy -e >/dev/null 2>tidy.log || { cat tidy.log >&2; exit 1; }
  step "3/4 compiling kube-apiserver $K8S_VERSION (several minutes on 2 cores)"
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${K8S_VERSION#v1.}" \
    -o "$APISERVER.tmp" k8s.io/kubernetes/cmd/kube-apiserver
  mv "$APISERVER.tmp" "$APISERVER"
fi

if [[ ! -x "$ETCD" ]]; then
  work="$CACHE/build/etcd-$ETCD_VERSION"
  rm -rf "$work"; mkdir -p "$work"; cd "$work"
  step "4/4 compiling etcd $ETCD_VERSION"
  cat > go.mod <<GOMOD
module wirekube.local/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat > main.go <<'GO'
// A minimal etcd binary: the server's own entry point, nothing added.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go mod tidy >/dev/null 2>tidy.log || { cat tidy.log >&2; exit 1; }
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$ETCD.tmp" .
  mv "$ETCD.tmp" "$ETCD"
fi

ln -sf "$(basename "$APISERVER")" "$BIN/kube-apiserver"
ln -sf "$(basename "$ETCD")" "$BIN/etcd"
step "ready: $APISERVER $ETCD"
echo "$BIN"
