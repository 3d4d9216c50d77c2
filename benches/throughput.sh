#!/usr/bin/env bash
# TCP throughput (iperf3) in one run on one machine, each path between network namespaces:
#   plain         phone -> hub -> svc over two veths, routed, no tunnel (the ceiling)
#   wireguard-go  two Debian wireguard-go interfaces over one veth, iperf3 straight through the tunnel
#   meshd         a phone (wireguard-go, set up from `meshctl device add --conf`) -> `meshd run
#                 --wireguard userspace` on the hub -> meshd's TCP forwarder -> iperf3 in the svc namespace
# Usage (root): benches/throughput.sh [--seconds N] [--reps N] [--only plain|wireguard-go|meshd]
# Binaries: $MESHD_BIN_DIR, else a release build made here. Everything it creates is removed on exit.
set -euo pipefail

seconds=10 reps=3 only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds=$2; shift 2 ;;
        --reps) reps=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "error: needs root (network namespaces)" >&2; exit 1; }
for tool in ip wg wg-quick wireguard-go iperf3 python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing (see .ci/run for the packages)" >&2; exit 1; }
done
wants() { [ -z "$only" ] || [ "$only" = "$1" ]; }

root=$(cd "$(dirname "$0")/.." && pwd)
tag=$$
umask 077
work=$(mktemp -d)
pids=() namespaces=() interfaces=() links=0

cleanup() {
    local pid ns ifname
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    for ifname in "${interfaces[@]}"; do rm -f "/var/run/wireguard/$ifname.sock"; done
    rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM

# netns NAME: a fresh namespace with loopback up.
netns() {
    ip netns add "$1"
    namespaces+=("$1")
    ip -n "$1" link set lo up
}

# link NS_A NS_B ADDR_A ADDR_B: a veth pair between two namespaces.
link() {
    links=$((links + 1))
    local a="v${tag}a$links" b="v${tag}b$links"
    ip -n "$1" link add "$a" type veth peer name "$b" netns "$2"
    ip -n "$1" addr add "$3" dev "$a"
    ip -n "$2" addr add "$4" dev "$b"
    ip -n "$1" link set "$a" up
    ip -n "$2" link set "$b" up
}

# start NS LOG CMD...: runs CMD in NS in the background, keeping its PID.
start() {
    local ns=$1 log=$2
    shift 2
    ip netns exec "$ns" "$@" >"$log" 2>&1 &
    pids+=($!)
}

# wg_go NS IF: a wireguard-go interface in NS, ready once its UAPI socket exists.
wg_go() {
    interfaces+=("$2")
    start "$1" "$work/$2.log" wireguard-go -f "$2"
    for _ in $(seq 100); do [ -S "/var/run/wireguard/$2.sock" ] && return 0; sleep 0.1; done
    echo "error: wireguard-go $2 did not start: $(cat "$work/$2.log")" >&2
    exit 1
}

# measure NS HOST PORT: iperf3 for $seconds s, prints Gbit/s received.
measure() {
    ip netns exec "$1" iperf3 -c "$2" -p "$3" -t "$seconds" -J >"$work/iperf.json" || {
        echo "error: iperf3 to $2:$3 from $1 failed: $(cat "$work/iperf.json")" >&2
        exit 1
    }
    python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))' \
        <"$work/iperf.json"
}

# reachable NS HOST PORT: waits up to 20 s until a 1-second iperf3 run gets through.
reachable() {
    for _ in $(seq 20); do
        ip netns exec "$1" iperf3 -c "$2" -p "$3" -t 1 >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "error: $2:$3 is not reachable from $1" >&2
    exit 1
}

# --- plain and meshd share the hub/svc/phone topology --------------------------------------------
hub="bench-hub-$tag" svc="bench-svc-$tag" phone="bench-phone-$tag"
if wants plain || wants meshd; then
    netns "$hub"; netns "$svc"; netns "$phone"
    link "$hub" "$svc" 169.254.1.1/24 169.254.1.17/24
    link "$hub" "$phone" 172.31.210.1/24 172.31.210.2/24
    start "$svc" "$work/iperf-svc.log" iperf3 -s -B 169.254.1.17 -p 5201
fi
if wants plain; then
    ip netns exec "$hub" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$phone" route add 169.254.1.0/24 via 172.31.210.1
    ip -n "$svc" route add 172.31.210.0/24 via 169.254.1.1
    reachable "$phone" 169.254.1.17 5201
fi

# --- wireguard-go reference: two interfaces over one veth ----------------------------------------
ref_a="bench-ref-a-$tag" ref_b="bench-ref-b-$tag"
if wants wireguard-go; then
    netns "$ref_a"; netns "$ref_b"
    link "$ref_a" "$ref_b" 172.31.211.1/24 172.31.211.2/24
    if_a="bwa$tag" if_b="bwb$tag"
    wg_go "$ref_a" "$if_a"; wg_go "$ref_b" "$if_b"
    wg genkey >"$work/a.key"; wg genkey >"$work/b.key"
    wg set "$if_a" private-key "$work/a.key" listen-port 51820 \
        peer "$(wg pubkey <"$work/b.key")" allowed-ips 10.211.0.2/32
    wg set "$if_b" private-key "$work/b.key" \
        peer "$(wg pubkey <"$work/a.key")" allowed-ips 10.211.0.1/32 endpoint 172.31.211.1:51820
    ip -n "$ref_a" addr add 10.211.0.1/24 dev "$if_a"
    ip -n "$ref_b" addr add 10.211.0.2/24 dev "$if_b"
    ip -n "$ref_a" link set "$if_a" mtu 1420 up
    ip -n "$ref_b" link set "$if_b" mtu 1420 up
    start "$ref_a" "$work/iperf-ref.log" iperf3 -s -B 10.211.0.1 -p 5201
    reachable "$ref_b" 10.211.0.1 5201
fi

# --- meshd: the hub's embedded userspace WireGuard and its TCP forwarder -------------------------
if wants meshd; then
    if [ -n "${MESHD_BIN_DIR:-}" ]; then
        bin=$MESHD_BIN_DIR
    else
        (cd "$root" && cargo build --release -p meshd -p meshctl)
        bin="${CARGO_TARGET_DIR:-$root/target}/release"
    fi
    state="$work/state" hub_if="bmh$tag" phone_if="bmp$tag"
    interfaces+=("$hub_if")
    "$bin/meshd" init --network bench --name hub --endpoint 172.31.210.1:51820 \
        --state-dir "$state" --interface "$hub_if" >/dev/null
    "$bin/meshctl" --state-dir "$state" service add iperf --node hub --target 169.254.1.17:5201 >/dev/null
    "$bin/meshctl" --state-dir "$state" device add bench --allow iperf --conf "$work/$phone_if.conf" >/dev/null
    start "$hub" "$work/meshd.log" env RUST_LOG=warn "$bin/meshd" run --state-dir "$state" --wireguard userspace
    for _ in $(seq 600); do [ -S "$state/meshd.sock" ] && break; sleep 0.1; done
    [ -S "$state/meshd.sock" ] || { echo "error: meshd did not start: $(cat "$work/meshd.log")" >&2; exit 1; }

    # The phone, set up from the config text only, as the WireGuard app would.
    wg_go "$phone" "$phone_if"
    wg-quick strip "$work/$phone_if.conf" | ip netns exec "$phone" wg setconf "$phone_if" /dev/stdin
    sed -n 's/^[[:space:]]*Address[[:space:]]*=//Ip' "$work/$phone_if.conf" | tr ',' '\n' | while read -r addr; do
        [ -n "$addr" ] || continue
        if [[ $addr == *:* ]]; then ip -n "$phone" addr add "$addr" dev "$phone_if" nodad
        else ip -n "$phone" addr add "$addr" dev "$phone_if"; fi
    done
    ip -n "$phone" link set "$phone_if" mtu 1420 up
    sed -n 's/^[[:space:]]*AllowedIPs[[:space:]]*=//Ip' "$work/$phone_if.conf" | tr ',' '\n' | while read -r cidr; do
        [ -n "$cidr" ] || continue
        ip -n "$phone" route replace "$cidr" dev "$phone_if"
    done
    mesh=$("$bin/meshctl" --state-dir "$state" service list --json |
        python3 -c 'import json,sys; print(next(s["mesh_address"] for s in json.load(sys.stdin) if s["name"] == "iperf"))')
    mesh_ip=${mesh%:*} mesh_port=${mesh##*:}
    reachable "$phone" "$mesh_ip" "$mesh_port"
fi

# --- measure, interleaved so that drift hits every path alike ------------------------------------
echo "TCP throughput, Gbit/s (iperf3, ${seconds} s per run, $(nproc) cores, $(uname -r))"
printf '%-6s %12s %14s %12s %16s\n' rep plain wireguard-go meshd meshd/wg-go
declare -a col_plain col_wg col_meshd
for rep in $(seq "$reps"); do
    p=- w=- m=- ratio=-
    if wants plain; then p=$(measure "$phone" 169.254.1.17 5201); col_plain+=("$p"); fi
    if wants wireguard-go; then w=$(measure "$ref_b" 10.211.0.1 5201); col_wg+=("$w"); fi
    if wants meshd; then m=$(measure "$phone" "$mesh_ip" "$mesh_port"); col_meshd+=("$m"); fi
    if [ "$w" != - ] && [ "$m" != - ]; then ratio=$(python3 -c "print('%.2f' % ($m / $w))"); fi
    printf '%-6s %12s %14s %12s %16s\n' "$rep" "$p" "$w" "$m" "$ratio"
done
median() { [ $# -gt 0 ] && printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}' || echo -; }
mp=$(median "${col_plain[@]}") mw=$(median "${col_wg[@]}") mm=$(median "${col_meshd[@]}") mr=-
if [ "$mw" != - ] && [ "$mm" != - ]; then mr=$(python3 -c "print('%.2f' % ($mm / $mw))"); fi
printf '%-6s %12s %14s %12s %16s\n' median "$mp" "$mw" "$mm" "$mr"
