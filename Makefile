# tern: `make demo` shows the plugins at work, `make test` runs the whole suite.
# Both install the Debian packages they need first (scripts/setup.sh), as root.

SHELL := /bin/bash
# rustup's cargo, even when the login profile did not put it on PATH.
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
# Integration tests are parallel-safe and mostly wait on the kernel and on
# child processes, so a little more than the 2 cores pays off.
TEST_THREADS ?= 4
# The executable is linked statically and not position-independent, like the
# reference plugins' Go executables: a runtime starts it for every ADD and
# DEL, and without the dynamic loader (~0.7 ms) and the start-up relocation
# of a static PIE (~0.2 ms) a start costs that much less (BENCHMARKS.md). An
# explicit --target keeps the flags off build scripts and proc macros, which
# must stay dynamic.
HOST := $(shell PATH="$(PATH)" rustc -vV 2>/dev/null | sed -n 's/^host: //p')
STATIC := RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static'
CARGO_FLAGS := --release --target $(HOST)
TERN := target/$(HOST)/release/tern

.PHONY: all setup build test demo demo-cni bench lint clean

all: build

setup:
	bash scripts/setup.sh

build:
	$(STATIC) $(CARGO) build $(CARGO_FLAGS)

test: setup
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		set -x; \
		$(STATIC) $(CARGO) nextest run --workspace $(CARGO_FLAGS) --test-threads $(TEST_THREADS) && \
		$(STATIC) $(CARGO) test --workspace $(CARGO_FLAGS) --doc; \
	else \
		set -x; \
		$(STATIC) $(CARGO) test --workspace $(CARGO_FLAGS) -- --test-threads $(TEST_THREADS); \
	fi

demo: setup
	$(STATIC) $(CARGO) build $(CARGO_FLAGS)
	TERN=$(TERN) bash scripts/demo.sh

# The single-node CNI demo: three pods on a bridge through `tern cni`.
demo-cni: setup
	$(STATIC) $(CARGO) build $(CARGO_FLAGS)
	TERN=$(TERN) bash scripts/demo-cni.sh

bench: setup
	$(STATIC) $(CARGO) build $(CARGO_FLAGS)
	$(TERN) bench cni
	$(TERN) bench datapath

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
