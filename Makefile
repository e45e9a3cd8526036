# tern: `make demo` shows the plugins at work, `make test` runs the whole suite.
# Both install the Debian packages they need first (scripts/setup.sh), as root.

SHELL := /bin/bash
# rustup's cargo, even when the login profile did not put it on PATH.
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
# Integration tests are parallel-safe and mostly wait on the kernel and on
# child processes, so a little more than the 2 cores pays off.
TEST_THREADS ?= 4
TERN := target/release/tern

.PHONY: all setup build test demo bench lint clean

all: build

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --release

test: setup
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		set -x; \
		$(CARGO) nextest run --workspace --release --test-threads $(TEST_THREADS) && \
		$(CARGO) test --workspace --release --doc; \
	else \
		set -x; \
		$(CARGO) test --workspace --release -- --test-threads $(TEST_THREADS); \
	fi

demo: setup
	$(CARGO) build --release
	bash scripts/demo.sh

bench: setup
	$(CARGO) build --release
	$(TERN) bench cni
	$(TERN) bench datapath

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
