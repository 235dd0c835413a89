#!/usr/bin/env bash
# Soak: a release zerodrop (SQLite, or Redis with its own redis-server) under
# `zerodrop drill --profile standard` for MINUTES with CLIENTS concurrent clients that publish,
# subscribe, ack, drop at random and resume; the server's RSS and open files are sampled every
# 10 s and their slope reported (least squares over the run after the first 2 minutes).
#
#   scripts/soak.sh sqlite|redis [MINUTES=30] [CLIENTS=2000]
#
# Everything runs on loopback and is stopped on exit. The drill's report (lost, duplicated,
# out of order, resume success) and samples.csv land in OUT (default .output/soak-<store>-<time>).
set -euo pipefail
cd "$(dirname "$0")/.."
store=${1:?usage: scripts/soak.sh sqlite|redis [MINUTES] [CLIENTS]}
minutes=${2:-30}
clients=${3:-2000}
out=${OUT:-.output/soak-$store-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
# As many open files as allowed: 2,000 clients and the server need some 5,000.
ulimit -n "$(ulimit -Hn)"
cargo build --release --locked -q
bin=target/release/zerodrop
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

args=(--max-connections 10000 --max-sessions-per-subject 0)
if [ "$store" = redis ]; then
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --dir "$work" --save "" --appendonly yes \
    --appendfsync everysec --daemonize no >"$work/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
  args+=(--store redis --redis-url "redis://127.0.0.1:$rport")
fi
port=$(free_port)
env -u ZERODROP_API_KEY -u ZERODROP_JWT_SECRET -u ZERODROP_ADMIN_TOKEN \
  ZERODROP_WEBHOOK_DRILL_STREAM=drill:webhooks ZERODROP_LOG=warn \
  "$bin" serve --listen "127.0.0.1:$port" --data-dir "$work/data" "${args[@]}" >"$work/server.log" 2>&1 &
server=$!
pids+=($server)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break; sleep 0.1; done

echo "t_s,rss_kb,fds" >"$out/samples.csv"
start=$(date +%s)
(
  while kill -0 "$server" 2>/dev/null; do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$server/status" 2>/dev/null || echo 0)
    fds=$(ls "/proc/$server/fd" 2>/dev/null | wc -l)
    echo "$(( $(date +%s) - start )),$rss,$fds" >>"$out/samples.csv"
    sleep 10
  done
) &
pids+=($!)

set +e
"$bin" drill --url "http://127.0.0.1:$port" --data-dir "$work/data" --profile standard \
  --minutes "$minutes" --limit "$clients" --out-dir "$out" | tee "$out/drill.txt"
verdict=${PIPESTATUS[0]}
set -e

# Least-squares slope per minute of RSS (MB) and open files after the first 2 minutes.
awk -F, -v from=120 '
  NR > 1 && $1 >= from { n++; x += $1; y += $2; z += $3; xx += $1*$1; xy += $1*$2; xz += $1*$3;
                         if (!first) { first = $2; ff = $3 } last = $2; lf = $3 }
  END {
    if (n < 3) { print "too few samples for a slope"; exit }
    d = n*xx - x*x
    printf "RSS: %.1f MB at 2 min, %.1f MB at the end; slope %.3f MB/min\n", first/1024, last/1024, (n*xy - x*y)/d*60/1024
    printf "open files: %d at 2 min, %d at the end; slope %.2f per min\n", ff, lf, (n*xz - x*z)/d*60
  }' "$out/samples.csv" | tee "$out/slope.txt"
echo "drill exit $verdict; report and samples in $out"
exit "$verdict"
