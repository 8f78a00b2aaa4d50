# One entry point per common task. README and .ci/run call these targets.
SHELL := /bin/bash
CARGO ?= cargo
export CORESCALE_CACHE ?= $(HOME)/.cache/corescale
CRD := crds/virtualmachines.corescale.dev.yaml
CHART_CRD := charts/corescale/crds/virtualmachines.corescale.dev.yaml

.PHONY: help deps generate check-generated lint test guest guest-disk e2e bench demo ci clean

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

deps: ## Install system packages (QEMU 10 from bookworm-backports, etcd, Prometheus, busybox)
	bash scripts/install-deps.sh

generate: ## Regenerate the CRD into crds/ and the chart
	$(CARGO) run -q -p corescale-api --bin crdgen > $(CRD).tmp && mv $(CRD).tmp $(CRD)
	cp $(CRD) $(CHART_CRD)

check-generated: generate ## Fail when generated files differ from the committed ones
	@git diff --exit-code -- crds charts/corescale/crds || { echo "generated files drifted: run 'make generate' and commit" >&2; exit 1; }
	@test -z "$$(git status --porcelain -- crds charts/corescale/crds)" || { echo "untracked generated files: run 'make generate' and commit" >&2; exit 1; }

lint: ## rustfmt, clippy (warnings are errors), no module import circles
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 scripts/check-module-cycles.py

guest: guest-disk ## Build (or reuse) the test guest images (x86_64, ppc64le, aarch64) and the Debian disk image from Debian packages
	bash node-vmm/guest/build.sh --arch x86_64 && bash node-vmm/guest/build.sh --arch ppc64le && bash node-vmm/guest/build.sh --arch aarch64

guest-disk: ## Build (or reuse) the Debian 12 disk image (qcow2 + vmlinux + initrd) for workloads
	bash node-vmm/guest/build-disk.sh --arch x86_64

test: guest ## Unit and integration tests, real QEMU guests included
	$(CARGO) test --workspace

e2e: guest ## The whole system: real kube-apiserver, operator, node agents, QEMU guests, Prometheus
	bash e2e/run.sh

bench: guest ## Benchmarks (print figures; not pass/fail)
	bash e2e/bench.sh

demo: deps guest ## Bring up a local cluster, apply the example VM and scale it
	bash e2e/demo.sh

ci: deps check-generated lint chart-check test e2e node-e2e ## Everything CI runs (the real-node stage last: it must not run beside the e2e stack)

clean:
	$(CARGO) clean

.PHONY: chart-check
chart-check: ## Helm lint/template + values schema, promtool check/test of the alerts, dashboard queries, Dockerfile check
	bash scripts/check-chart.sh
	bash scripts/check-dockerfile.sh
	bash scripts/check-dockerfile.sh --self-test

.PHONY: scale
scale: ## Scale benchmarks on simulated nodes: 100/300/1000 VMs, 10 agents (figures + JSON + docs/scale-growth.png; not part of ci)
	bash e2e/scale.sh

.PHONY: bench-cel
bench-cel: ## The CRD's validation cost: kube-apiserver CPU per write under the old CRD, the same without CEL, and crds/ (ratios; own control plane; not part of ci)
	bash e2e/crd-cost-bench.sh

.PHONY: node-deps images node-up node-down node-e2e
node-deps: ## Install what a real kubelet node needs too (containerd, runc, CNI plugins, podman, buildah, mmdebstrap, ...)
	bash scripts/install-deps.sh --node

images: node-deps ## Build both images from the Dockerfile with podman (local base images, no registry); load them into the node of node-up if it runs
	@if [ -S e2e/.run/node/containerd/containerd.sock ]; then \
		bash e2e/node/images.sh --load e2e/.run/node/containerd/containerd.sock; \
	else bash e2e/node/images.sh; fi

node-up: node-deps ## A real kubelet node (containerd, kubelet, kube-scheduler, kube-proxy) on the e2e control plane
	bash e2e/node/up.sh

node-down: ## Stop node-up's node and remove what it created
	bash e2e/node/down.sh

node-e2e: node-deps guest ## helm install --wait of the chart on a real kubelet node from the Dockerfile's images, then the node scenarios (scale, launcher resources, metrics, agent restart, helm upgrade, pod delete, workload, uninstall); torn down (the last stage of make ci)
	bash e2e/node/e2e.sh
