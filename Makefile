# pg_reaper's entry points. Each installs what it uses when it is missing (scripts/setup.sh).
.PHONY: help test check run bench soak setup install lint audit package portable images

help: ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  make %-8s %s\n", $$1, $$2 }'

test: ## every test, on PostgreSQL 15 then 14, 16, 17, 18 (PG=N: everything on one major)
	bash scripts/test.sh

check: ## the inner loop: format, clippy, the relay's unit tests and simulation, the pg_tests
	bash scripts/check.sh

run: ## a throwaway cluster, worker, relay and sample API recovering stranded executions (EDITION=portable: the extension-free edition)
	EDITION=$(EDITION) bash scripts/run.sh

bench: ## the benchmarks, as ratios against baselines of the same run (docs/benchmarks.md)
	bash scripts/bench.sh

soak: ## producers, crashing workers, the worker and two relays for SOAK_SECONDS, then the invariants
	bash scripts/soak.sh

setup: ## install what building and testing need
	bash scripts/setup.sh

install: ## build the extension and install it into Debian's PostgreSQL 15 (PG_CONFIG: another)
	SETUP_FOR=build bash scripts/setup.sh
	cargo pgrx install --pg-config $${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

lint: ## rustfmt and clippy
	SETUP_FOR=build bash scripts/setup.sh
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

audit: ## cargo-deny over the lock file, and clippy
	SETUP_FOR=build bash scripts/setup.sh
	bash scripts/audit.sh

portable: ## the extension-free edition: one SQL file, target/portable/pg_reaper.sql
	python3 scripts/sql.py portable

package: ## the Debian packages of the extension and the relay
	bash scripts/package.sh

images: ## the database and relay container images (podman, from Debian and the packages)
	bash scripts/containers.sh
