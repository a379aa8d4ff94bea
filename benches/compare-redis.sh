#!/usr/bin/env bash
# Ivy and Redis Streams side by side, on this machine, in one sitting: the issue's goals quote
# Redis figures measured elsewhere, and only a side-by-side run says how the two compare here.
#
#   cargo build --release && bash benches/compare-redis.sh [ROUNDS] [SECONDS]
#
# Needs redis-server and redis-benchmark on PATH (Debian: `apt-get install redis-server`).
# Each round runs, alternating so that drift in the machine hits both alike:
# - publish: 100-byte events from 4 connections, 256 unacknowledged per connection, every
#   acknowledgement durable. Ivy: `ivy-bench publish` under `--durability always` (a sliding
#   window). Redis: `XADD` with `appendfsync always`, `redis-benchmark -c 4 -P 256` (a pipeline
#   of 256 sent together and waited for together).
# - history: the last 100 of a stream of 100,000 100-byte events, 32 keep-alive connections.
#   Ivy: `ivy-bench history` (GET /events/hist/c?n=100). Redis: `XREVRANGE hist + - COUNT 100`.
# The two clients differ (ivy-bench is a Rust tokio client, redis-benchmark is C), and each takes
# CPU from the server on the same cores; ivy-bench reports what each side took.
set -euo pipefail

rounds=${1:-3}
seconds=${2:-10}
here=$(cd "$(dirname "$0")/.." && pwd)
ivy=$here/target/release/ivy
bench=$here/target/release/ivy-bench
for tool in redis-server redis-benchmark "$ivy" "$bench"; do
    command -v "$tool" >/dev/null || { echo "missing: $tool (see the comment at the top)" >&2; exit 2; }
done

work=$(mktemp -d)
ivy_port=9391
redis_port=6391
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

start_ivy() {
    rm -rf "$work/ivy"
    "$ivy" serve --listen "127.0.0.1:$ivy_port" --data "$work/ivy" --log error >/dev/null 2>&1 &
    ivy_pid=$!
    pids+=("$ivy_pid")
    for _ in $(seq 50); do
        (echo >"/dev/tcp/127.0.0.1/$ivy_port") 2>/dev/null && return
        sleep 0.1
    done
    echo "ivy did not start" >&2
    exit 1
}

stop_ivy() {
    kill -INT "$ivy_pid"
    wait "$ivy_pid" || true
}

# $1: extra redis-server arguments.
start_redis() {
    rm -rf "$work/redis" && mkdir -p "$work/redis"
    # shellcheck disable=SC2086
    redis-server --port "$redis_port" --dir "$work/redis" --save "" $1 >/dev/null 2>&1 &
    redis_pid=$!
    pids+=("$redis_pid")
    for _ in $(seq 50); do
        redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "redis-server did not start" >&2
    exit 1
}

stop_redis() {
    kill "$redis_pid"
    wait "$redis_pid" || true
}

# redis-benchmark's final summary line: "NAME: RPS requests per second, p50=... msec".
redis_rps() { grep -oE '[0-9.]+ requests per second' | tail -1 | cut -d' ' -f1; }
redis_p99() { awk '/latency summary/ {getline; getline; print $5}'; }

data=$(printf 'x%.0s' $(seq 100))
results=$work/results
: >"$results"

# $1: publish or history; $2: the pattern of ivy-bench's rate. Appends "WHAT ivy RATE P99".
run_ivy() {
    start_ivy
    out=$("$bench" --addr "127.0.0.1:$ivy_port" --server-pid "$ivy_pid" --seconds "$seconds" "$1")
    stop_ivy
    echo "$out" | sed "s/^/round $round ivy: /"
    rate=$(echo "$out" | grep -oE "$2" | cut -d' ' -f1)
    p99=$(echo "$out" | grep -oE 'p99 [0-9.]+ ms' | head -1 | cut -d' ' -f2)
    echo "$1 ivy $rate $p99" >>"$results"
}

# $1: publish or history; $2: redis-server arguments; the rest: redis-benchmark's. The history
# stream gets its 100,000 entries, in pipelined batches, before the clock starts.
run_redis() {
    local what=$1 server_args=$2
    shift 2
    start_redis "$server_args"
    if [ "$what" = history ]; then
        for _ in $(seq 100); do
            for _ in $(seq 1000); do echo "XADD hist * d $data"; done |
                redis-cli -p "$redis_port" --pipe >/dev/null
        done
    fi
    out=$(redis-benchmark -p "$redis_port" "$@" 2>/dev/null | tr '\r' '\n')
    stop_redis
    rate=$(echo "$out" | redis_rps)
    p99=$(echo "$out" | redis_p99)
    echo "round $round redis: $what $rate requests/s, p99 $p99 ms"
    echo "$what redis $rate $p99" >>"$results"
}

for round in $(seq "$rounds"); do
    run_ivy publish '[0-9]+ acknowledged events/s'
    # Latency is per pipeline of 256, sent and answered together.
    run_redis publish "--appendonly yes --appendfsync always" \
        -c 4 -P 256 -n $((seconds * 400000)) XADD s '*' d "$data"
    run_ivy history '[0-9]+ requests/s'
    run_redis history "--appendonly no" \
        -c 32 -n $((seconds * 15000)) XREVRANGE hist + - COUNT 100
done

echo
echo "medians of $rounds rounds (rate, p99 ms):"
for what in publish history; do
    for who in ivy redis; do
        rates=$(awk -v w="$what" -v s="$who" '$1 == w && $2 == s {print $3}' "$results" | sort -g)
        p99s=$(awk -v w="$what" -v s="$who" '$1 == w && $2 == s {print $4}' "$results" | sort -g)
        mid=$(((rounds + 1) / 2))
        printf '%-8s %-6s %10s /s  p99 %s\n' "$what" "$who" \
            "$(echo "$rates" | sed -n "${mid}p")" "$(echo "$p99s" | sed -n "${mid}p")"
    done
done
