#!/usr/bin/env bash
# A rate-limited test network on one machine, for runs over edge-like links.
#
#   scripts/edge_net.sh up PREFIX RATE [RATE ...]   # e.g. up pst 100mbit 10mbit
#   scripts/edge_net.sh down PREFIX
#   scripts/edge_net.sh check                        # exit 0 if namespaces can be made here
#
# `up` makes a namespace PREFIX-ps for the shards and one namespace PREFIX-wI per RATE for
# worker I, each joined to PREFIX-ps by a veth pair of its own with a token-bucket filter
# (`tc qdisc ... tbf rate RATE`) on both ends, so every worker has its own link, limited in
# both directions (a push and a pull each cross it at RATE). Worker I's link is the
# 10.77.I.0/24 network: the shards' side is 10.77.I.1, the worker's 10.77.I.2. Run a
# process in a namespace with `ip netns exec PREFIX-ps CMD` (shards listen on 0.0.0.0 or on
# each link's 10.77.I.1; worker I connects to 10.77.I.1). `tc netem` (delay, loss) needs a
# kernel module these machines lack; tbf is in the base kernel. Needs root (CAP_NET_ADMIN).
set -euo pipefail

usage() {
  sed -n '2,16p' "$0" >&2
  exit 2
}

link_up() { # NS IFACE ADDR RATE
  local ns=$1 iface=$2 addr=$3 rate=$4
  ip -n "$ns" addr add "$addr/24" dev "$iface"
  ip -n "$ns" link set "$iface" up
  # A bucket of about 10 ms at the rate (at least 32 KiB) and 50 ms of queue: what a real
  # link's shaper holds, so bursts are not smoothed over seconds. PSTRAIN_EDGE_BURST_FLOOR
  # sets the least bucket in bytes instead of 32 KiB (below it, a transfer smaller than the
  # bucket crosses at the veth's speed: at 10 Mbit/s a 32 KiB bucket is 26 ms of the link).
  local bits=${rate%bit}
  local bps
  case "$bits" in
    *k) bps=$(( ${bits%k} * 1000 )) ;;
    *m) bps=$(( ${bits%m} * 1000000 )) ;;
    *g) bps=$(( ${bits%g} * 1000000000 )) ;;
    *) bps=$bits ;;
  esac
  local burst=$(( bps / 8 / 100 ))
  local floor=${PSTRAIN_EDGE_BURST_FLOOR:-32768}
  (( burst < floor )) && burst=$floor
  ip netns exec "$ns" tc qdisc replace dev "$iface" root tbf rate "$rate" burst "$burst" latency 50ms
}

up() {
  local prefix=$1
  shift
  (( $# >= 1 )) || usage
  ip netns add "$prefix-ps"
  ip -n "$prefix-ps" link set lo up
  local i=0
  for rate in "$@"; do
    local ns="$prefix-w$i"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "${prefix}p$i" netns "$prefix-ps" type veth peer name "${prefix}w$i" netns "$ns"
    link_up "$prefix-ps" "${prefix}p$i" "10.77.$i.1" "$rate"
    link_up "$ns" "${prefix}w$i" "10.77.$i.2" "$rate"
    echo "worker $i: namespace $ns, shards at 10.77.$i.1, $rate each way"
    i=$((i + 1))
  done
}

down() {
  local prefix=$1
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$prefix-(ps|w[0-9]+)$" || true); do
    ip netns del "$ns"
  done
}

check() {
  local ns="pstrain-check-$$"
  if ip netns add "$ns" 2>/dev/null; then
    ip netns del "$ns"
    exit 0
  fi
  echo "cannot create network namespaces here (needs root / CAP_NET_ADMIN)" >&2
  exit 1
}

case "${1:-}" in
  up) shift; (( $# >= 2 )) || usage; up "$@" ;;
  down) shift; (( $# == 1 )) || usage; down "$1" ;;
  check) check ;;
  *) usage ;;
esac
