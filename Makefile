# pg_reaper: `make test` runs every test (`make test PG=17`: all of them on one major); `make run`
# is the demo. Both install what they need.
.PHONY: test run bench soak setup install lint audit package

test:
	bash scripts/test.sh

run:
	bash scripts/run.sh

setup:
	bash scripts/setup.sh

install: setup
	cargo pgrx install --pg-config $${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

audit: setup
	bash scripts/audit.sh

bench:
	bash scripts/bench.sh

soak:
	bash scripts/soak.sh

package:
	bash scripts/package.sh
