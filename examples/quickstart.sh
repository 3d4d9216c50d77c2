#!/usr/bin/env bash
# Provision a network on an embedded default and print a phone's QR code, no root needed:
# the controller's SQLite state goes to ./meshd-state (or $MESHD_STATE_DIR).
# Run it again to add another phone. `sudo meshd run --state-dir ./meshd-state` then brings the hub up.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${MESHD_BIN_DIR:-}" ]; then
  bin=$MESHD_BIN_DIR                             # binaries built already (the tests use this)
else
  cargo build --quiet --bins
  # Wherever cargo puts them: CARGO_TARGET_DIR, build.target-dir in a cargo config, or ./target.
  target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  [ -d "$target/debug" ] || { echo "error: cannot find cargo's target directory (got '$target')" >&2; exit 1; }
  bin=$target/debug
fi
state=${MESHD_STATE_DIR:-./meshd-state}
endpoint=${MESHD_ENDPOINT:-203.0.113.10:51820}   # where phones reach this host: your public IP or name

if [ ! -e "$state/meshd.db" ]; then
  "$bin/meshd" init --network home --name hub --endpoint "$endpoint" --state-dir "$state"
  # A nix-bitcoin style service: a wallet UI on the host (any TCP service works).
  "$bin/meshctl" --state-dir "$state" service add wallet --node hub --target 127.0.0.1:9737
fi
n=1
devices=$("$bin/meshctl" --state-dir "$state" device list --json)   # read once, no pipe for pipefail to trip on
while grep -q "\"phone$n\"" <<<"$devices"; do n=$((n + 1)); done
"$bin/meshctl" --state-dir "$state" device add "phone$n" --allow wallet --qr
"$bin/meshctl" --state-dir "$state" service list
