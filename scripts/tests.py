#!/usr/bin/env python3
"""Runs the test binaries of the given cargo packages several at a time: `cargo test` runs one
binary after the other, and these binaries spend most of their time waiting on servers (a
worker's naptime, a relay's backoff, a lease running out), not on the CPU.

    scripts/tests.py [-j JOBS] [--skip-binary NAME]... [--skip-test PATTERN]... CARGO_TEST_ARGS...
        e.g. scripts/tests.py -p pg-reaper-relay --test chaos

--skip-test passes libtest's --skip to every binary: the tests whose names contain PATTERN are
not run, and each binary's summary counts them as filtered out, not passed.

Builds with `cargo test --no-run`, then runs each binary in its package's directory, as cargo
does, at most JOBS (default 3, env TEST_JOBS) at once, longest first by the last run's
durations (target/test-durations.json). Each binary's output is printed whole when it ends;
the exit status is 1 when any binary failed.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATIONS = os.path.join(ROOT, "target", "test-durations.json")


def binaries(cargo_args):
    """(name, executable, package directory) of every test binary cargo builds for the args."""
    out = subprocess.run(["cargo", "test", "--locked", "--no-run", "--message-format=json-render-diagnostics",
                          *cargo_args], cwd=ROOT, stdout=subprocess.PIPE, check=True, text=True).stdout
    found = []
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
            target = msg["target"]
            kind = target["kind"][0]
            cwd = os.path.dirname(msg["manifest_path"])
            found.append((f"{os.path.relpath(cwd, ROOT)} {kind} {target['name']}", msg["executable"], cwd))
    return found


def run(binary, test_args):
    name, exe, cwd = binary
    start = time.monotonic()
    done = subprocess.run([exe, *test_args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return name, done.returncode, done.stdout, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-j", type=int, default=int(os.environ.get("TEST_JOBS", "3")))
    parser.add_argument("--skip-binary", action="append", default=[])
    parser.add_argument("--skip-test", action="append", default=[])
    args, cargo_args = parser.parse_known_args()
    try:
        with open(DURATIONS) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    start = time.monotonic()
    built = binaries(cargo_args)
    print(f"== {len(built)} test binaries built in {time.monotonic() - start:.0f} s", flush=True)
    todo = sorted((b for b in built if b[0] not in args.skip_binary), key=lambda b: -known.get(b[0], 0))
    test_args = [a for pattern in args.skip_test for a in ("--skip", pattern)]
    failed = []
    with ThreadPoolExecutor(max_workers=max(args.j, 1)) as pool:
        for future in as_completed([pool.submit(run, b, test_args) for b in todo]):
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
