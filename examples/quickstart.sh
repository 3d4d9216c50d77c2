#!/usr/bin/env bash
# Provision a network on an embedded default and print a phone's QR code, no root needed:
# the controller's SQLite state goes to ./meshd-state (or $MESHD_STATE_DIR), relative to where you run it.
# Set MESHD_ENDPOINT=your.public.name:51820 on the first run so that phones can find this host.
# Run it again to add another phone. Then hand the state to root and bring the hub up, as the script prints:
# `sudo mkdir -m 0700 /var/lib/meshd && sudo cp -RT ./meshd-state /var/lib/meshd && rm -rf ./meshd-state && sudo .../meshd run`
# (meshd, as root, refuses a state directory that another user owns or could swap; a copy makes new files, which no
# descriptor the user opened before can still write, as it could after a mv and chown).
set -euo pipefail
state=${MESHD_STATE_DIR:-./meshd-state}
case $state in /*) ;; *) state=$PWD/${state#./} ;; esac  # the caller's directory, not the repository's
placeholder=203.0.113.10:51820                          # a documentation address (RFC 5737): reaches nothing
endpoint=${MESHD_ENDPOINT:-$placeholder}                # where phones reach this host: your public IP or name
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

if [ ! -e "$state/meshd.db" ]; then
  "$bin/meshd" init --network home --name hub --endpoint "$endpoint" --state-dir "$state"
  # A nix-bitcoin style service: a wallet UI on the host (any TCP service works).
  "$bin/meshctl" --state-dir "$state" service add wallet --node hub --target 127.0.0.1:9737
fi
nodes=$("$bin/meshctl" --state-dir "$state" node list --json)    # the hub's endpoint as stored, whatever set it
if [ -n "${MESHD_ENDPOINT:-}" ] && ! grep -qF "\"$MESHD_ENDPOINT\"" <<<"$nodes"; then
  echo "warning: $state already holds a network whose hub has another endpoint; MESHD_ENDPOINT applies only when it is created (change it with: $bin/meshctl --state-dir $state node update hub --endpoint HOST:PORT)" >&2
fi
if grep -qF "\"$placeholder\"" <<<"$nodes"; then
  echo "warning: the endpoint is the placeholder $placeholder: phones will not reach this host; set yours with: $bin/meshctl --state-dir $state node update hub --endpoint your.public.name:51820" >&2
fi
n=1
devices=$("$bin/meshctl" --state-dir "$state" device list --json)   # read once, no pipe for pipefail to trip on
while grep -q "\"phone$n\"" <<<"$devices"; do n=$((n + 1)); done
"$bin/meshctl" --state-dir "$state" device add "phone$n" --allow wallet --qr
"$bin/meshctl" --state-dir "$state" service list
if [ "$(id -u)" = 0 ]; then
  echo "next: start the hub with  $bin/meshd run --state-dir $state" >&2
else
  # Root runs the hub only on state that no other user owns or can swap: /var/lib/meshd, root's own.
  echo "next: hand the state to root and start the hub with" >&2
  echo "  sudo mkdir -m 0700 /var/lib/meshd && sudo cp -RT $state /var/lib/meshd && rm -rf $state && sudo $bin/meshd run" >&2
  echo "then manage it as root:  sudo $bin/meshctl service list  (the state is root's from then on)" >&2
fi
