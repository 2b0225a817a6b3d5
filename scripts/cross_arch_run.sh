#!/usr/bin/env bash
# One real run across architectures: an x86-64 shard on loopback and an aarch64 `pstrain
# worker` run under qemu-user against it (convnet, async), then the shard's final checkpoint
# evaluated on the 10k test set and held to a threshold. It proves the wire format, the
# handshake (token) and the run plan between an x86 host and an ARM device.
#
# usage: scripts/cross_arch_run.sh X86_PSTRAIN AARCH64_PSTRAIN DATA_DIR [MIN_ACCURACY]
# needs: qemu-aarch64-static and the aarch64 C runtime (Debian: qemu-user-static,
# libc6-dev-arm64-cross, which puts it in /usr/aarch64-linux-gnu).
set -euo pipefail
x86=$1
arm=$2
data=$3
min_accuracy=${4:-80}
updates=300

# The worker binary must really be an aarch64 ELF (e_machine 0xb7 at offset 18).
if [ "$(od -An -tx1 -j18 -N2 "$arm" | tr -d ' \n')" != "b700" ]; then
  echo "cross-arch: $arm is not an aarch64 executable" >&2
  exit 1
fi

work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$x86" token -o "$work/run.token"
"$x86" server --listen 127.0.0.1:0 --shard 0 --shards 1 --workers 1 --model convnet \
  --mode async --iterations "$updates" --checkpoint-dir "$work/ckpt" \
  --token-file "$work/run.token" > "$work/server.log" 2>&1 &
server_pid=$!
address=""
for _ in $(seq 1 100); do
  address=$(sed -n 's/^listening on \(.*\)$/\1/p' "$work/server.log" | head -n 1)
  [ -n "$address" ] && break
  sleep 0.1
done
if [ -z "$address" ]; then
  echo "cross-arch: the x86 shard did not start:" >&2
  cat "$work/server.log" >&2
  exit 1
fi
echo "cross-arch: x86-64 shard on $address; aarch64 worker under qemu"

started=$(date +%s)
qemu-aarch64-static -L /usr/aarch64-linux-gnu "$arm" worker --servers "$address" --rank 0 \
  --threads 1 --data-dir "$data" --token-file "$work/run.token"
wait "$server_pid"
server_pid=""
echo "cross-arch: $updates updates in $(( $(date +%s) - started )) s"

report=$("$x86" eval --checkpoint "$work/ckpt" --data-dir "$data")
echo "$report"
accuracy=$(printf '%s\n' "$report" | sed -n 's/.*accuracy[^0-9]*\([0-9][0-9.]*\)%.*/\1/p' | head -n 1)
if [ -z "$accuracy" ]; then
  echo "cross-arch: no accuracy in the evaluation's output" >&2
  exit 1
fi
if ! awk -v a="$accuracy" -v m="$min_accuracy" 'BEGIN { exit !(a >= m) }'; then
  echo "cross-arch: test accuracy $accuracy% is below $min_accuracy%" >&2
  exit 1
fi
echo "cross-arch: test accuracy $accuracy% (at least $min_accuracy%): passed"
