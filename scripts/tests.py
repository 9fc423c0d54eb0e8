#!/usr/bin/env python3
"""Runs the test binaries of the given cargo packages several at a time: `cargo test` runs one
binary after the other, and these binaries spend most of their time waiting on servers (a
worker's naptime, a relay's backoff, a lease running out), not on the CPU.

    scripts/tests.py [-j JOBS] [--skip-binary NAME]... [--skip-test PATTERN]...
                     [--portable TEST]... CARGO_TEST_ARGS...
        e.g. scripts/tests.py -p pg-reaper-relay --test chaos

--skip-test passes libtest's --skip to every binary: the tests whose names contain PATTERN are
not run, and each binary's summary counts them as filtered out, not passed.

--portable TEST runs the integration test binary TEST a second time, in the same schedule,
against the extension-free edition (PG_REAPER_EDITION=portable), without its tests named
native_… (they are about the extension itself; its summary counts them as filtered out).

Builds with `cargo test --no-run`, then runs each binary in its package's directory, as cargo
does, at most JOBS (default 3, env TEST_JOBS) at once, longest first by the last run's
durations (target/test-durations.json, else the committed scripts/test-durations.json, so a
fresh clone also starts its longest binaries first). Each binary's output is printed whole
when it ends; the exit status is 1 when any binary failed.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATIONS = os.path.join(ROOT, "target", "test-durations.json")
COMMITTED_DURATIONS = os.path.join(ROOT, "scripts", "test-durations.json")
PORTABLE = " (extension-free)"

# A test binary cargo built: `name` is "package-dir kind target", e.g. "relay test chaos".
Binary = namedtuple("Binary", "name exe cwd target kind")
# One run of a binary: its name in the log and the durations, its arguments and environment.
Job = namedtuple("Job", "name exe cwd args env")


def binaries(cargo_args):
    """Every test binary cargo builds for the args."""
    out = subprocess.run(["cargo", "test", "--locked", "--no-run", "--message-format=json-render-diagnostics",
                          *cargo_args], cwd=ROOT, stdout=subprocess.PIPE, check=True, text=True).stdout
    found = []
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
            target = msg["target"]
            kind = target["kind"][0]
            cwd = os.path.dirname(msg["manifest_path"])
            found.append(Binary(f"{os.path.relpath(cwd, ROOT)} {kind} {target['name']}", msg["executable"], cwd,
                                target["name"], kind))
    return found


def jobs(built, args):
    """Every binary not skipped, then the extension-free runs."""
    skip = [a for pattern in args.skip_test for a in ("--skip", pattern)]
    todo = [Job(b.name, b.exe, b.cwd, skip, None) for b in built if b.name not in args.skip_binary]
    portable = dict(os.environ, PG_REAPER_EDITION="portable")
    for test in args.portable:
        found = [b for b in built if b.target == test and b.kind == "test"]
        if not found:
            sys.exit(f"tests.py: --portable {test}: no integration test binary of that name was built")
        todo += [Job(b.name + PORTABLE, b.exe, b.cwd, [*skip, "--skip", "native_"], portable) for b in found]
    return todo


def load_durations():
    for path in (DURATIONS, COMMITTED_DURATIONS):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
    return {}


def run(job):
    start = time.monotonic()
    done = subprocess.run([job.exe, *job.args], cwd=job.cwd, env=job.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    return job.name, done.returncode, done.stdout, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-j", type=int, default=int(os.environ.get("TEST_JOBS", "3")))
    parser.add_argument("--skip-binary", action="append", default=[])
    parser.add_argument("--skip-test", action="append", default=[])
    parser.add_argument("--portable", action="append", default=[])
    args, cargo_args = parser.parse_known_args()
    known = load_durations()
    start = time.monotonic()
    built = binaries(cargo_args)
    print(f"== {len(built)} test binaries built in {time.monotonic() - start:.0f} s", flush=True)
    todo = sorted(jobs(built, args), key=lambda j: -known.get(j.name, 0))
    failed = []
    with ThreadPoolExecutor(max_workers=max(args.j, 1)) as pool:
        for future in as_completed([pool.submit(run, j) for j in todo]):
            name, code, output, seconds = future.result()
            print(f"== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s")
            print(output, flush=True)
            known[name] = round(seconds, 1)
            if code != 0:
                failed.append(name)
    os.makedirs(os.path.dirname(DURATIONS), exist_ok=True)
    with open(DURATIONS, "w") as f:
        json.dump(known, f, indent=1, sort_keys=True)
    if failed:
        print("== failed: " + ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
