# WireKube developer entry points.  A newcomer needs two: `make lab` and `make test`.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/wirekube
export PATH := $(CURDIR)/.venv/bin:$(CACHE)/bin:$(CACHE)/tools:$(PATH)
PYTEST_ARGS ?=

.PHONY: setup images lab-chart test-chart test test-kernel unit lab lab-down bench bench-relay bench-nat bench-scale bench-writes bench-gateway clean

setup:  ## install Debian packages, build kube-apiserver/etcd, helm/kubectl, Python venv
	@bash ci/setup.sh

images: setup  ## the agent, relay and gateway images with buildah (cached) into ~/.cache/wirekube/images, then checked
	@bash ci/build-images.sh
	@.venv/bin/python ci/check-images.py --built

test: setup  ## everything: unit, real API server, network namespaces, chart
	@bash ci/test.sh $(PYTEST_ARGS)

test-kernel: setup  ## only the lab's kernel nodes (qemu TCG guests with kernel WireGuard; ~20 min, part of `make test`)
	@WIREKUBE_KERNEL_LAB=1 .venv/bin/python -m pytest -ra --durations=5 tests/integration/test_lab_kernel.py $(PYTEST_ARGS)

unit: setup  ## the fast pure tests only
	@.venv/bin/python -m pytest -q tests/unit $(PYTEST_ARGS)

lab: setup  ## the EKS Hybrid scenario (TOPOLOGY=NAME|FILE, default `default`): every NAT kind, gateway, pods; ends with the four-plane check
	@.venv/bin/wirekube-lab up $(TOPOLOGY)

test-chart: setup  ## the chart on real kubelet nodes (tests/integration/test_chart_kubelet.py); needs what lab-chart builds; not yet in `make test`
	@WIREKUBE_CONTROL_PLANE_NODES=1 bash ci/build-control-plane.sh >/dev/null
	@bash ci/build-images.sh
	@WIREKUBE_CHART_LAB=1 .venv/bin/python -m pytest -ra -s tests/integration/test_chart_kubelet.py $(PYTEST_ARGS)

lab-chart: setup  ## the Helm chart on 3 real kubelet nodes: builds kubelet & co. and the images (cached), then `helm install`
	@WIREKUBE_CONTROL_PLANE_NODES=1 bash ci/build-control-plane.sh >/dev/null
	@bash ci/build-images.sh
	@.venv/bin/wirekube-lab up chart

lab-down:
	@.venv/bin/wirekube-lab down

bench: setup bench-relay bench-nat bench-scale bench-gateway  ## every benchmark; results in bench/results/*.json, then bench/REPORT.md
	@.venv/bin/python bench/report.py

bench-gateway: setup  ## gateway failover (agent stopped / health target lost) in the eks-hybrid lab
	@.venv/bin/python bench/gateway_bench.py

bench-scale: setup  ## one agent's view of 100..1,000 peers in the real API server; relay with 1,000 clients; watch fan-out by layout at 100/1,000/5,000 nodes (issue 20)
	@.venv/bin/python bench/scale_bench.py

bench-writes: setup  ## steady-state status writes per node over 10 minutes in the default lab (issue 20)
	@.venv/bin/python bench/writes_bench.py

bench-nat: setup  ## convergence, failover blackout over 10 cuts, relayed vs direct iperf3 (default lab)
	@.venv/bin/python bench/nat_bench.py

bench-relay: setup
	@.venv/bin/python bench/relay_bench.py --out bench/results/relay.json

clean:
	rm -rf .venv .pytest_cache .hypothesis
