#!/usr/bin/env bash
# Build the real kube-apiserver and etcd (and, for the kubelet lab, kubelet, kube-controller-manager
# and kube-scheduler of the same version) from the Go module proxy into a cache outside the repo.
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
# The node-side components for the kubelet lab (#22), same version as the API server.  Skip them
# with WIREKUBE_CONTROL_PLANE_NODES=0 (only kube-apiserver/etcd are built then).
NODE_COMPONENTS=(kubelet kube-controller-manager kube-scheduler)
[[ "${WIREKUBE_CONTROL_PLANE_NODES:-1}" == 0 ]] && NODE_COMPONENTS=()
TOTAL=$((2 + ${#NODE_COMPONENTS[@]}))
N=0

step() { printf '[build-control-plane] %s\n' "$*" >&2; }

# A module that requires k8s.io/kubernetes with its staging modules pointed at the published
# releases, importing the given commands (so `go mod tidy` fetches exactly their graph).
k8s_module() {  # dir cmd...
  local dir=$1 c; shift
  mkdir -p "$dir"; cd "$dir"
  if [[ ! -f go.sum || ! -f .tools ]] || [[ "$(cat .tools)" != "$*" ]]; then
    step "resolving k8s.io/kubernetes@$K8S_VERSION for $* (staging modules -> $STAGING_VERSION)"
    local modfile
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
    {
      printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for c in "$@"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
      printf ')\n'
    } > tools.go
    step "downloading the module graph of $*"
    go mod tidy -e >/dev/null 2>tidy.log || { cat tidy.log >&2; exit 1; }
    echo "$*" > .tools
  fi
}

k8s_build() {  # cmd out
  local t0=$SECONDS
  N=$((N + 1))
  step "$N/$TOTAL compiling $1 $K8S_VERSION (cold: several minutes on 2 cores; warm: under a minute)"
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${K8S_VERSION#v1.}" \
    -o "$2.tmp" "k8s.io/kubernetes/cmd/$1"
  mv "$2.tmp" "$2"
  step "$N/$TOTAL $1 done in $((SECONDS - t0)) s"
}

if [[ ! -x "$APISERVER" ]]; then
  k8s_module "$CACHE/build/kube-apiserver-$K8S_VERSION" kube-apiserver
  k8s_build kube-apiserver "$APISERVER"
else
  N=$((N + 1))
fi

for c in "${NODE_COMPONENTS[@]}"; do
  if [[ ! -x "$BIN/$c-$K8S_VERSION" ]]; then
    k8s_module "$CACHE/build/kube-nodes-$K8S_VERSION" "${NODE_COMPONENTS[@]}"
    k8s_build "$c" "$BIN/$c-$K8S_VERSION"
  else
    N=$((N + 1))
  fi
  ln -sf "$c-$K8S_VERSION" "$BIN/$c"
done

if [[ ! -x "$ETCD" ]]; then
  work="$CACHE/build/etcd-$ETCD_VERSION"
  rm -rf "$work"; mkdir -p "$work"; cd "$work"
  N=$((N + 1)); step "$N/$TOTAL compiling etcd $ETCD_VERSION"
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
step "ready: $APISERVER $ETCD ${NODE_COMPONENTS[*]}"
echo "$BIN"
