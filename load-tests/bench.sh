#!/usr/bin/env bash
# Benchmark: builds the release binary, starts the server with
# load-tests/bench.toml on 127.0.0.1, and measures in one run with wrk, in
# each storage mode (embedded, then services) on a fresh server and store:
#   1. GET /healthz                       (the ceiling)
#   2. purchases on a sold-out sale       (the hot "no"), and one buyer's
#      purchase replayed with its Idempotency-Key (the stock actor's
#      round trip, without the order log)
#   3. durable reservations, ample stock, a distinct buyer per request
#      then, against the machine's drift, short pairs of /healthz and
#      reservations; in services mode also other connection counts
# then checks that the store holds every order answered 201
# (BENCH_CORE_ONLY=1 stops here and prints this part); then, in services
# mode, on a
# fresh server, 4. the goose `rush` scenario (100,000 distinct buyers, goose
# throttled, invariant check included) while sampling the server's memory;
# then, on a fresh server with the shipped rate limits on, 5. hostile
# clients: a sold-out storm from one buyer and an unauthenticated flood (both
# with a body, as browsers send them; nearly every answer a 429), and logins
# of an unknown user (the password-hashing capacity, and the memory of a
# 400-way login flood); then, on a fresh server, 6. a big sale
# (BENCH_BIG_UNITS units, default 2,000,000, to as many distinct buyers):
# resident memory per sold unit and the restart time with all of it in
# PostgreSQL; then, on a fresh server, 7. live updates: the reservation rate
# without and with BENCH_STREAMS (10,000) event streams open, memory per
# stream, and how soon every stream shows the sale sold out; and writes a
# Markdown report under load-tests/reports/.
# Every run is bounded: BENCH_SECONDS (default 10) per ceiling/rejection run,
# BENCH_RESERVE_SECONDS (default 30) for the reservation run.
# load-tests/ab.sh runs steps 1-3 once per variant of the configuration, to
# compare throughput knobs.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_SHORT=${BENCH_SECONDS:-10}
SECONDS_RESERVE=${BENCH_RESERVE_SECONDS:-30}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
# Each reservation waits for its batch's confirm (a few ms), so reaching a
# high rate takes more requests in flight (Little's law), and past the
# machine's capacity more connections only lengthen the queue: the p99 of
# the 201s is about twice the connections over the rate. The default is the
# crowd that gets the most from the machine with that p99 within 25 ms.
# Since a batch goes at its predecessor's confirm (rather than after
# the whole batch delay), the same crowd waits less: measured with
# load-tests/ab.sh (alternated rounds of 16 s runs, services mode, 2-core
# benchmark machine, one session): 320 connections 0.34-0.35 of /healthz
# (three runs), p99 18.0-24.4 ms; 384: 0.36-0.43 (four runs, median 0.39),
# p99 17.5-19.1 ms, with larger batches and less CPU per reservation;
# 448: 0.41 and 0.34 (p99 20.2 and 28.8 ms).
# Since a batch smaller than its predecessor waits a moment for as many
# (rabbitmq.batch_gather_us), batches are larger, the machine idles while
# they wait, and a larger crowd takes that up (load-tests/ab.sh, one
# session): 384 connections 0.39 and 0.39, p99 18.3-19.2 ms; 448: 0.42,
# 0.42, 0.42, 0.43 (p99 16.7-22.5 ms); 512: 0.42-0.44 (four runs, p99
# 19.2-21.6 ms). 448 keeps more of the tail's margin for a slower day.
# Before batches went at the confirm (three rounds, one session): 320
# connections 0.32-0.39 of /healthz (median 0.37), p99 21-25 ms; 384: 0.31-0.44
# (0.35), p99 26-30 ms; 768: 0.33-0.43 (0.37), p99 43-54 ms. Earlier
# sessions: on a fast day 768 gave 0.37 with p99 21-24 ms; on a day when
# the machine ran at about half that speed, 768 gave 0.29-0.36 with p99
# 54-78 ms and 256 gave 0.24-0.27 with p99 20-24 ms. So the tail follows
# the machine's speed over the connections, and the rate does not grow
# past a few hundred.
RESERVE_CONNECTIONS=${BENCH_RESERVE_CONNECTIONS:-448}
# The crowd's size against the tail, in services mode: after the main
# reservation run, shorter runs (BENCH_SWEEP_SECONDS, default 10) at each of
# BENCH_SWEEP_CONNECTIONS, each on a sale of its own so that the same buyers
# buy again. Empty: none (load-tests/ab.sh skips them).
SWEEP_CONNECTIONS=${BENCH_SWEEP_CONNECTIONS-128 256 512 768}
SWEEP_SECONDS=${BENCH_SWEEP_SECONDS:-10}
# This machine's speed drifts by a fifth within a minute, and the main
# run's /healthz is measured half a minute before its reservations. So in
# each mode BENCH_PAIRS (default 5) pairs follow: /healthz for
# BENCH_PAIR_HEALTHZ_SECONDS (3), then at once reservations for
# BENCH_PAIR_RESERVE_SECONDS (6) at the main run's connections on a sale of
# their own; each pair's ratio compares two runs seconds apart, and the
# report gives every pair and the median.
PAIRS=${BENCH_PAIRS-5}
PAIR_HEALTHZ_SECONDS=${BENCH_PAIR_HEALTHZ_SECONDS:-3}
PAIR_RESERVE_SECONDS=${BENCH_PAIR_RESERVE_SECONDS:-6}
THREADS=${BENCH_THREADS:-1}
PORT=18080
BASE="http://127.0.0.1:$PORT"
ADMIN="Authorization: Bearer bench-admin-token"
WORK=$(mktemp -d)
SERVER_PID=
# BENCH_RABBITMQ_EMBED_BELOW (default empty: the broker as it is): keep
# messages under this many bytes in the queue's index rather than in the
# broker's shared message store (RabbitMQ's `queue_index_embed_msgs_below`,
# which config.toml's `rabbitmq.queue` describes with its figures; reproduce
# them with `load-tests/ab.sh shipped embed:BENCH_RABBITMQ_EMBED_BELOW=65536`).
# Set on the running broker for as long as the run lasts, so it applies to
# the queues the run declares; the broker's own value comes back at exit.
EMBED_BELOW=${BENCH_RABBITMQ_EMBED_BELOW:-}
EMBED_BEFORE=
embed_below() { rabbitmqctl -q eval "application:set_env(rabbit, queue_index_embed_msgs_below, $1)." >/dev/null; }
trap 'kill $SERVER_PID 2>/dev/null || true; rm -rf "$WORK"; [ -z "$EMBED_BEFORE" ] || embed_below "$EMBED_BEFORE"' EXIT

scripts/services
if [ -n "$EMBED_BELOW" ]; then
  EMBED_BEFORE=$(rabbitmqctl -q eval 'case application:get_env(rabbit, queue_index_embed_msgs_below) of {ok, V} -> V; undefined -> 4096 end.')
  embed_below "$EMBED_BELOW"
fi
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q -p flashsale -p flashsale-load-tests

# A fresh world for services mode: database and queues of the benchmark only.
fresh_services() {
  psql -q -h 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE IF EXISTS flashsale_bench WITH (FORCE)' >/dev/null
  for q in flashsale.bench.orders flashsale.bench.dead; do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true; done
}
# Starts the server with load-tests/bench.toml and `VAR=value` overrides,
# and waits until it is ready.
start_server() {
  env "$@" target/release/flashsale --config load-tests/bench.toml &
  SERVER_PID=$!
  for _ in $(seq 1 3000); do curl -sf "$BASE/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "$BASE/readyz" >/dev/null || { echo "bench: server not ready" >&2; exit 1; }
}
stop_server() { kill -TERM $SERVER_PID; wait $SERVER_PID || true; }

# BENCH_MODES: the storage modes of steps 1-3 (default both); only with
# BENCH_CORE_ONLY=1 may it name one.
MODES=${BENCH_MODES:-embedded services}
if [ "${BENCH_CORE_ONLY:-0}" != 1 ] && [ "$MODES" != "embedded services" ]; then
  echo "bench: the full report needs both storage modes; BENCH_MODES goes with BENCH_CORE_ONLY=1" >&2; exit 1
fi
BIG_UNITS=${BENCH_BIG_UNITS:-2000000}
TOKENS=$(( SECONDS_RESERVE * 90000 ))
[ "$TOKENS" -ge "$BIG_UNITS" ] || TOKENS=$BIG_UNITS
# Step 7 takes its three runs' buyers from the first 2,500,000.
[ "$TOKENS" -ge 2500000 ] || TOKENS=2500000
# BENCH_TOKENS: a file of at least that many tokens minted in the last hour
# (load-tests/ab.sh mints once for all its runs); otherwise minted here.
if [ -n "${BENCH_TOKENS:-}" ] && [ "$(wc -l < "$BENCH_TOKENS")" -ge "$TOKENS" ]; then
  ln -s "$(realpath "$BENCH_TOKENS")" "$WORK/tokens.txt"
else
  target/release/flashsale-mint --config load-tests/bench.toml --count "$TOKENS" --out "$WORK/tokens.txt"
fi
head -n 20000 "$WORK/tokens.txt" > "$WORK/few-tokens.txt"
# The paired and sweep runs' buyers: as many as their longest run needs
# (wrk reads its whole file before it starts).
SHORT_SECONDS=$(( PAIR_RESERVE_SECONDS > SWEEP_SECONDS ? PAIR_RESERVE_SECONDS : SWEEP_SECONDS ))
head -n $(( SHORT_SECONDS * 90000 )) "$WORK/tokens.txt" > "$WORK/short-tokens.txt"

sale() { # stock limit
  curl -sf -X POST "$BASE/admin/v1/sales" -H "$ADMIN" -H 'content-type: application/json' \
    -d "{\"name\":\"bench\",\"price_cents\":100,\"stock_total\":$1,\"per_user_limit\":$2,\"starts_at\":\"2020-01-01T00:00:00Z\",\"ends_at\":\"2099-01-01T00:00:00Z\"}" \
    | python3 -c 'import sys,json; print(json.load(sys.stdin)["id"])'
}

run_wrk() { # name seconds connections script-args...
  local name=$1 secs=$2 conns=$3; shift 3
  WRK_THREADS=$THREADS wrk -t"$THREADS" -c"$conns" -d"${secs}s" --timeout 5s "$@" > "$WORK/$name.out" 2>&1
  cat "$WORK/$name.out"
}
field() { grep -E "^$2" "$WORK/$1.out" | awk '{print $NF}' | head -n1; }
rps() { grep -E '^Requests/sec' "$WORK/$1.out" | awk '{print $2}'; }
non2xx() { cat "$WORK/$1.out" 2>/dev/null | awk '/Non-2xx/ {n=$NF} END {print n+0}'; }
created() { local t; t=$(field "$1" requests); echo $(( ${t:-0} - $(non2xx "$1") )); }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

# CPU during the busy part of a reservation run, per durable reservation,
# from samples taken every 2 s (clock ticks): the busy part is the
# intervals in which the server (the first column) used more than half a
# core, so wrk's start-up, which reads every token, is left out.
#   processes: the server, PostgreSQL, RabbitMQ and wrk, as % of one core
#     and in µs;
#   machine: the whole machine's time split into user, system, idle and
#     steal, and the context switches per durable reservation;
#   threads: the server's CPU by thread role (the server names its threads
#     fs-http, fs-pipeline, fs-writers, fs-sqlite-log; lapin-io-loop is the
#     RabbitMQ client's), in µs.
busy_cpu() { # processes|machine|threads samples-file 201s-per-second
  python3 - "$1" "$2" "$(getconf CLK_TCK)" "$3" "$(nproc)" <<'PY'
import sys
kind, path, tck, rate, cores = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
names = {"processes": ["server", "PostgreSQL", "RabbitMQ", "wrk"],
         "threads": ["all", "fs-http", "fs-pipeline", "fs-writers", "fs-sqlite-log", "lapin-io-loop", "other"],
         "machine": ["server", "user", "system", "idle", "steal", "switches"]}[kind]
rows = [list(map(int, l.split())) for l in open(path) if len(l.split()) == len(names)]
busy = [[b - a for a, b in zip(r0, r1)] for r0, r1 in zip(rows, rows[1:])]
busy = [d for d in busy if d[0] > tck]
if not busy or rate <= 0:
    print("not sampled")
    sys.exit()
pct = [100.0 * sum(d[i] for d in busy) / (2 * tck * len(busy)) for i in range(len(names))]
us = [p / 100 * 1e6 / rate for p in pct]
if kind == "machine":
    ticks = sum(sum(d[1:5]) for d in busy)
    split = ", ".join(f"{n} {100.0 * sum(d[i] for d in busy) / ticks:.0f}%" for i, n in enumerate(names[1:5], 1))
    switches = sum(d[5] for d in busy) / (2.0 * len(busy))
    print(f"{split}; {switches / rate:.2f} context switches per durable reservation ({switches:.0f}/s)")
elif kind == "processes":
    parts = ", ".join(f"{n} {p:.0f}% ({u:.0f} µs)" for n, p, u in zip(names, pct, us))
    print(f"{parts}; {sum(pct):.0f}% of the machine's {100 * cores}% in all, {sum(us):.0f} µs of CPU per durable reservation ({len(busy)} busy 2 s intervals)")
else:
    print(", ".join(f"{n} {u:.1f} µs" for n, u in list(zip(names, us))[1:]))
PY
}

# Each pair's 201 rate over its /healthz rate, and its p99, then medians.
pairs_line() { # mode
  local i rows=""
  for i in $(seq 1 "$PAIRS"); do
    rows+="$(rps "$1-pair$i-healthz") $(created "$1-pair$i-reserve") $(non2xx "$1-pair$i-reserve") $(field "$1-pair$i-reserve" p99_ms)
"
  done
  python3 - "$PAIR_RESERVE_SECONDS" <<PY
import statistics, sys
secs = float(sys.argv[1])
pairs = []
for line in """$rows""".split("\n"):
    p = line.split()
    if len(p) == 4:
        h, ok, bad, p99 = float(p[0]), int(p[1]), int(p[2]), float(p[3])
        pairs.append((ok / secs / h, p99, bad))
if not pairs:
    print("no pair measured")
else:
    each = "; ".join(f"{r:.2f} (p99 {q:.1f} ms)" for r, q, _ in pairs)
    print(f"ratios {each}; median ratio **{statistics.median(r for r, _, _ in pairs):.2f}**, median p99 **{statistics.median(q for _, q, _ in pairs):.1f} ms**, {sum(b for _, _, b in pairs)} answers not 2xx")
PY
}

# Mean entries per order-log batch and mean time to its confirm, from a
# scrape of /metrics.
pipeline_line() { # metrics-file
  python3 - "$1" <<'PY'
import sys
v = {}
for line in open(sys.argv[1]):
    if line.startswith("flashsale_order_log_") and " " in line:
        name, value = line.rsplit(" ", 1)
        v[name] = float(value)
b = v.get("flashsale_order_log_batch_size_count", 0)
if not b:
    print("no batch")
else:
    size = v["flashsale_order_log_batch_size_sum"] / b
    conf = 1000 * v.get("flashsale_order_log_confirm_seconds_sum", 0) / max(v.get("flashsale_order_log_confirm_seconds_count", 0), 1)
    print(f"{int(b)} batches of {size:.1f} entries on average, {conf:.2f} ms on average from append to confirm")
PY
}

# The server's CPU so far (clock ticks), and its CPU per request of a wrk
# run between two such readings, in µs (the run's idle start-up adds
# nothing: the server does no work while wrk prepares).
server_ticks() { awk '{print $14+$15}' /proc/$SERVER_PID/stat; }
per_request_us() { # ticks-before ticks-after run-name
  python3 -c "import sys; t0, t1, tck, n = map(float, sys.argv[1:]); print(f'{(t1 - t0) / tck * 1e6 / n:.1f}' if n else '-')" \
    "$1" "$2" "$(getconf CLK_TCK)" "$(awk '/ requests in / {print $1}' "$WORK/$3.out")"
}

# 1-3 in one storage mode, on a fresh server and store: /healthz, the
# sold-out storm, durable reservations (with the samplers), then a graceful
# stop and the count of what the store holds. Results in $WORK/MODE-*.out
# and the arrays below, keyed by mode.
declare -A MACHINE SERVER_US_HEALTHZ SERVER_US_SOLDOUT SERVER_US_REPLAY ROLES PIPELINE STORED CREATED DEPTH_MAX DEPTH_LAST RSS_PEAK CPU POLLS POLL_MAX SOLDOUT_409 SOLDOUT_OTHER RESERVE_TOTAL RESERVE_NON2XX
core_runs() { # embedded | services
  local m=$1
  if [ "$m" = services ]; then
    fresh_services
    start_server FLASHSALE__STORAGE__MODE=services
  else
    rm -f "$WORK"/embedded.db*
    start_server FLASHSALE__STORAGE__MODE=embedded FLASHSALE__STORAGE__PATH="$WORK/embedded.db"
  fi
  local sold ample
  sold=$(sale 1 1)
  curl -sf -X POST "$BASE/api/v1/sales/$sold/purchases" -H "Authorization: Bearer $(head -n1 "$WORK/few-tokens.txt")" >/dev/null
  ample=$(sale 10000000 1)
  local t0
  t0=$(server_ticks)
  echo "== $m: healthz"; run_wrk "$m-healthz" "$SECONDS_SHORT" "$CONNECTIONS" -s load-tests/wrk/latency.lua "$BASE/healthz"
  SERVER_US_HEALTHZ[$m]=$(per_request_us "$t0" "$(server_ticks)" "$m-healthz")
  # The sold-out run sends one prebuilt request (a shopper's token in a
  # header), so wrk spends exactly what it spends on /healthz: the ratio
  # compares the server's two paths, not two client scripts. Its one token
  # is answered from each worker's verified-token cache once the worker
  # has verified it twice, as a buyer pressing "buy" again is. A short second run rotates
  # 20,000 buyers and counts the answers, to show they are all 409s.
  t0=$(server_ticks)
  echo "== $m: sold out"; run_wrk "$m-soldout" "$SECONDS_SHORT" "$CONNECTIONS" -H "Authorization: Bearer $(sed -n 2p "$WORK/few-tokens.txt")" -s load-tests/wrk/post.lua "$BASE/api/v1/sales/$sold/purchases"
  SERVER_US_SOLDOUT[$m]=$(per_request_us "$t0" "$(server_ticks)" "$m-soldout")
  # A replay: one buyer repeats a purchase with the same Idempotency-Key,
  # after its order is durable. The stock actor answers it from memory,
  # without the order log, so this run costs what the sold-out run does
  # plus the round trip to the stock actor (and an order's body): beside
  # it, the reservation run's extra cost is the full token check and the
  # order log.
  local replayed buyer
  replayed=$(sale 10 1); buyer=$(sed -n 3p "$WORK/few-tokens.txt")
  curl -sf -X POST "$BASE/api/v1/sales/$replayed/purchases" -H "Authorization: Bearer $buyer" -H 'Idempotency-Key: bench-replay' >/dev/null
  t0=$(server_ticks)
  echo "== $m: replay"; run_wrk "$m-replay" "$SECONDS_SHORT" "$CONNECTIONS" -H "Authorization: Bearer $buyer" -H 'Idempotency-Key: bench-replay' -s load-tests/wrk/post.lua "$BASE/api/v1/sales/$replayed/purchases"
  SERVER_US_REPLAY[$m]=$(per_request_us "$t0" "$(server_ticks)" "$m-replay")
  echo "== $m: sold out, many buyers, answers counted"; run_wrk "$m-soldout-count" 3 "$CONNECTIONS" -s load-tests/wrk/purchase.lua "$BASE" -- "/api/v1/sales/$sold/purchases" "$WORK/few-tokens.txt"
  echo "== $m: reserve"
  local pids=()
  # The queue depth as the server sees it (its publisher asks RabbitMQ once a
  # second): `rabbitmqctl` boots an Erlang VM per call, over a second of CPU,
  # which took a fifth off the reservation rate of this run when it sampled.
  ( while sleep 2; do curl -s "$BASE/metrics" | awk '$1=="flashsale_order_queue_depth"{print $2}'; done ) > "$WORK/$m-depth.txt" &
  pids+=($!)
  ( while sleep 1; do ps -o rss= -p $SERVER_PID; done ) > "$WORK/$m-rss.txt" &
  pids+=($!)
  # CPU of every process in the run, every 2 s (clock ticks): the server,
  # PostgreSQL, RabbitMQ and wrk. The report averages the intervals in which
  # the server was busy (wrk's start-up, which reads every token, is not).
  ( while sleep 2; do
      printf '%s ' "$(awk '{print $14+$15}' /proc/$SERVER_PID/stat 2>/dev/null || echo 0)"
      { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk '
        $2 == "(postgres)" {pg += $14 + $15} $2 == "(beam.smp)" {mq += $14 + $15} $2 == "(wrk)" {wk += $14 + $15}
        END {print pg + 0, mq + 0, wk + 0}'
    done ) > "$WORK/$m-cpu.txt" &
  pids+=($!)
  # The whole machine at the same moments (/proc/stat, clock ticks): the
  # server's ticks first (to find the busy intervals), then user (with
  # nice), system (with interrupts), idle (with I/O wait), steal (time the
  # hypervisor gave to other guests), and context switches. On a shared
  # virtual machine steal is one reason why the same build measures faster
  # one hour than the next (a host busy in ways the guest cannot see is
  # another: the report's argon2 login rate shows the CPU's speed).
  ( while sleep 2; do
      printf '%s ' "$(awk '{print $14+$15}' /proc/$SERVER_PID/stat 2>/dev/null || echo 0)"
      awk '$1 == "cpu" {u = $2 + $3; s = $4 + $7 + $8; i = $5 + $6; st = $9} $1 == "ctxt" {c = $2}
        END {print u, s, i, st, c}' /proc/stat
    done ) > "$WORK/$m-machine.txt" &
  pids+=($!)
  # The server's threads by role, at the same moments (a thread that ended
  # between two samples drops out of "other").
  ( while sleep 2; do
      for t in /proc/$SERVER_PID/task/*; do
        printf '%s %s\n' "$(cat "$t/comm" 2>/dev/null)" "$(awk '{print $14+$15}' "$t/stat" 2>/dev/null)"
      done | awk '{n=$1; v=$NF; all+=v; if (n=="fs-http"||n=="fs-pipeline"||n=="fs-writers"||n=="fs-sqlite-log"||n=="lapin-io-loop") r[n]+=v; else o+=v}
        END {print all+0, r["fs-http"]+0, r["fs-pipeline"]+0, r["fs-writers"]+0, r["fs-sqlite-log"]+0, r["lapin-io-loop"]+0, o+0}'
    done ) > "$WORK/$m-threads.txt" &
  pids+=($!)
  # An operator polling the actor status every second during the run.
  ( while sleep 1; do curl -s -o /dev/null -w '%{time_total}\n' -H "$ADMIN" "$BASE/admin/v1/actors"; done ) > "$WORK/$m-poll.txt" &
  pids+=($!)
  # reserve.lua formats every request once at start and has no response
  # callback, so wrk's own CPU stays small; 201s are counted as requests
  # minus non-2xx answers and checked against the store below.
  run_wrk "$m-reserve" "$SECONDS_RESERVE" "$RESERVE_CONNECTIONS" -s load-tests/wrk/reserve.lua "$BASE" -- "/api/v1/sales/$ample/purchases" "$WORK/tokens.txt"
  kill "${pids[@]}" 2>/dev/null || true
  # The order log's batches and confirms over the server's life (the
  # reservation run is nearly all of it).
  curl -sf "$BASE/metrics" > "$WORK/$m-metrics.txt" || true
  PIPELINE[$m]=$(pipeline_line "$WORK/$m-metrics.txt")
  for i in $(seq 1 "$PAIRS"); do
    echo "== $m: pair $i"
    run_wrk "$m-pair$i-healthz" "$PAIR_HEALTHZ_SECONDS" "$CONNECTIONS" -s load-tests/wrk/latency.lua "$BASE/healthz"
    run_wrk "$m-pair$i-reserve" "$PAIR_RESERVE_SECONDS" "$RESERVE_CONNECTIONS" -s load-tests/wrk/reserve.lua "$BASE" -- "/api/v1/sales/$(sale 10000000 1)/purchases" "$WORK/short-tokens.txt"
  done
  if [ "$m" = services ]; then
    for c in $SWEEP_CONNECTIONS; do
      echo "== $m: reserve, $c connections"
      run_wrk "$m-sweep-$c" "$SWEEP_SECONDS" "$c" -s load-tests/wrk/reserve.lua "$BASE" -- "/api/v1/sales/$(sale 10000000 1)/purchases" "$WORK/short-tokens.txt"
    done
  fi
  # A graceful stop (services: the writers drain the log); then the store
  # must hold every 201.
  stop_server
  if [ "$m" = services ]; then
    STORED[$m]=$(psql -tA -h 127.0.0.1 -U postgres -d flashsale_bench -c "SELECT COUNT(*) FROM orders WHERE sale_id = '$ample' AND status = 'reserved'")
  else
    STORED[$m]=$(python3 -c "import sqlite3,sys,uuid; c=sqlite3.connect(sys.argv[1]); print(c.execute(\"SELECT COUNT(*) FROM orders WHERE sale_id = ? AND status = 'reserved'\", (uuid.UUID(sys.argv[2]).bytes,)).fetchone()[0])" "$WORK/embedded.db" "$ample")
  fi
  RESERVE_TOTAL[$m]=$(field "$m-reserve" requests); RESERVE_TOTAL[$m]=${RESERVE_TOTAL[$m]:-0}
  RESERVE_NON2XX[$m]=$(awk '/Non-2xx/ {print $NF}' "$WORK/$m-reserve.out"); RESERVE_NON2XX[$m]=${RESERVE_NON2XX[$m]:-0}
  CREATED[$m]=$(( RESERVE_TOTAL[$m] - RESERVE_NON2XX[$m] ))
  SOLDOUT_OTHER[$m]=$(awk '/^status / && $2 != "409:" {s+=$3} END {print s+0}' "$WORK/$m-soldout-count.out")
  SOLDOUT_409[$m]=$(awk '/^status 409:/ {print $3}' "$WORK/$m-soldout-count.out")
  DEPTH_MAX[$m]=$(sort -n "$WORK/$m-depth.txt" | tail -n1); DEPTH_MAX[$m]=${DEPTH_MAX[$m]:-0}
  DEPTH_LAST[$m]=$(tail -n1 "$WORK/$m-depth.txt"); DEPTH_LAST[$m]=${DEPTH_LAST[$m]:-0}
  RSS_PEAK[$m]=$(sort -n "$WORK/$m-rss.txt" | tail -n1)
  POLLS[$m]=$(wc -l < "$WORK/$m-poll.txt"); POLL_MAX[$m]=$(sort -n "$WORK/$m-poll.txt" | tail -n1)
  CPU[$m]=$(busy_cpu processes "$WORK/$m-cpu.txt" "$(( CREATED[$m] / SECONDS_RESERVE ))")
  MACHINE[$m]=$(busy_cpu machine "$WORK/$m-machine.txt" "$(( CREATED[$m] / SECONDS_RESERVE ))")
  ROLES[$m]=$(busy_cpu threads "$WORK/$m-threads.txt" "$(( CREATED[$m] / SECONDS_RESERVE ))")
}

for m in $MODES; do core_runs "$m"; done

# The RabbitMQ setting the run had (config.toml, `rabbitmq.queue`).
broker_line() {
  if [ -n "$EMBED_BELOW" ]; then
    echo "RabbitMQ: messages under $EMBED_BELOW bytes kept in the queue index (\`queue_index_embed_msgs_below\`, see config.toml's \`rabbitmq.queue\`; the broker had $EMBED_BEFORE and has it back)."
  else
    echo "RabbitMQ: as the broker was set up (BENCH_RABBITMQ_EMBED_BELOW not set)."
  fi
}

# The report's part on steps 1-3, both modes.
core_report() {
  echo "Each storage mode on a fresh server and store, one after the other, with the same workload; every ratio is to the /healthz of the same mode's run."
  echo
  echo "| mode | run | seconds | req/s | ratio to /healthz | p50 ms | p99 ms | p99.9 ms |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  for m in $MODES; do
    mh=$(rps "$m-healthz")
    echo "| $m | GET /healthz (ceiling) | $SECONDS_SHORT | $mh | 1.00 | $(field "$m-healthz" p50_ms) | $(field "$m-healthz" p99_ms) | $(field "$m-healthz" p999_ms) |"
    echo "| $m | purchase, sold-out sale | $SECONDS_SHORT | $(rps "$m-soldout") | $(ratio "$(rps "$m-soldout")" "$mh") | $(field "$m-soldout" p50_ms) | $(field "$m-soldout" p99_ms) | $(field "$m-soldout" p999_ms) |"
    echo "| $m | purchase replayed (Idempotency-Key) | $SECONDS_SHORT | $(rps "$m-replay") | $(ratio "$(rps "$m-replay")" "$mh") | $(field "$m-replay" p50_ms) | $(field "$m-replay" p99_ms) | $(field "$m-replay" p999_ms) |"
    echo "| $m | purchase, ample stock (all answers) | $SECONDS_RESERVE | $(rps "$m-reserve") | $(ratio "$(rps "$m-reserve")" "$mh") | $(field "$m-reserve" p50_ms) | $(field "$m-reserve" p99_ms) | $(field "$m-reserve" p999_ms) |"
  done
  echo
  for m in $MODES; do
    mh=$(rps "$m-healthz"); r201=$(( CREATED[$m] / SECONDS_RESERVE ))
    echo "### $m"
    echo
    echo "- Durable reservations: ${CREATED[$m]} answered 201 in $SECONDS_RESERVE s = **$r201/s** ($(ratio "$r201" "$mh") of /healthz). After a graceful stop the store holds ${STORED[$m]} orders: every 201, plus $(( STORED[$m] - CREATED[$m] )) made for requests wrk abandoned when its time ran out."
    echo "- CPU during the reservation run, as % of one core (and per durable reservation at the run's 201 rate): ${CPU[$m]}."
    echo "- The server's CPU per durable reservation by thread (same intervals): ${ROLES[$m]}."
    echo "- The server's CPU per request in the other runs: /healthz ${SERVER_US_HEALTHZ[$m]} µs, sold-out purchase ${SERVER_US_SOLDOUT[$m]} µs, replayed purchase ${SERVER_US_REPLAY[$m]} µs ($(non2xx "$m-replay") answers not 2xx)."
    echo "- The whole machine in the same intervals: ${MACHINE[$m]}."
    echo "- Order log: ${PIPELINE[$m]}."
    echo "- Rejection p99 over /healthz p99: $(ratio "$(field "$m-soldout" p99_ms)" "$(field "$m-healthz" p99_ms)")."
    echo "- Sold-out check run (3 s, 20,000 rotating buyers, $(rps "$m-soldout-count") req/s with wrk's per-request Lua): ${SOLDOUT_409[$m]:-0} answers 409, ${SOLDOUT_OTHER[$m]} others."
    if [ "$PAIRS" -gt 0 ]; then
      echo "- Paired runs, after the main run: $PAIRS times /healthz for $PAIR_HEALTHZ_SECONDS s, then at once reservations for $PAIR_RESERVE_SECONDS s at $RESERVE_CONNECTIONS connections on a sale of their own: $(pairs_line "$m")."
    fi
    if [ "$m" = services ] && [ -n "$SWEEP_CONNECTIONS" ]; then
      echo "- The crowd's size: the main run, then runs of $SWEEP_SECONDS s after it, each on a sale of its own (with the main run's orders still in memory and in PostgreSQL); ratios to this mode's /healthz:"
      echo
      echo "  | connections | seconds | 201/s | ratio | p50 ms | p99 ms | not 2xx |"
      echo "  | --- | --- | --- | --- | --- | --- | --- |"
      echo "  | $RESERVE_CONNECTIONS (main run) | $SECONDS_RESERVE | $r201 | $(ratio "$r201" "$mh") | $(field "$m-reserve" p50_ms) | $(field "$m-reserve" p99_ms) | ${RESERVE_NON2XX[$m]} |"
      for c in $SWEEP_CONNECTIONS; do
        local ok=$(( $(created "$m-sweep-$c") / SWEEP_SECONDS ))
        echo "  | $c | $SWEEP_SECONDS | $ok | $(ratio "$ok" "$mh") | $(field "$m-sweep-$c" p50_ms) | $(field "$m-sweep-$c" p99_ms) | $(non2xx "$m-sweep-$c") |"
      done
      echo
    fi
    [ "$m" = services ] && echo "- Order queue depth during the reservation run (the server's \`flashsale_order_queue_depth\`, sampled every 2 s): max ${DEPTH_MAX[$m]}, last ${DEPTH_LAST[$m]}."
    echo "- Server resident memory peak: $(( ${RSS_PEAK[$m]:-0} / 1024 )) MiB."
    echo "- GET /admin/v1/actors polled every second during the reservation run: ${POLLS[$m]} polls, slowest ${POLL_MAX[$m]} s."
    echo "- Reservation run: ${RESERVE_TOTAL[$m]} answers, ${RESERVE_NON2XX[$m]} of them not 2xx (each request a new buyer, so none should be)."
    echo
  done
  echo "- The sold-out run repeats one buyer's request, so once a worker has verified its token twice, the token comes from that worker's verified-token cache (\`auth.token_cache_per_worker\`), as for a buyer pressing \"buy\" again; the reservation run gives every request a new token, verified in full."
}

# BENCH_CORE_ONLY=1: steps 1-3 only, their report on stdout.
if [ "${BENCH_CORE_ONLY:-0}" = 1 ]; then broker_line; core_report; exit 0; fi

# 4. The rush, on a fresh server and database, with goose (throttled so it
# does not starve the server; goose costs ~4x wrk's CPU per request).
fresh_services
start_server
( while sleep 0.5; do ps -o rss= -p $SERVER_PID; done ) > "$WORK/rush-rss.txt" &
RSS_PID=$!
RUSH_SECONDS=${BENCH_RUSH_SECONDS:-30}
echo "== rush (goose)"
target/release/flashsale-load --server-config load-tests/bench.toml --scenario rush \
  --buyers 100000 --stock 50000 --start-delay 3 --users 256 --increase-rate 256 \
  --run-time "${RUSH_SECONDS}s" --throttle-requests "${BENCH_RUSH_THROTTLE:-15000}" \
  --no-reset-metrics --report-file "$WORK/rush.md" > "$WORK/rush.out" 2>&1 || RUSH_RC=$?
RUSH_RC=${RUSH_RC:-0}
kill $RSS_PID 2>/dev/null || true
stop_server
RUSH_RSS=$(sort -n "$WORK/rush-rss.txt" | tail -n1)
RUSH_RESULT=$(awk '/^invariants hold|FAILED/' "$WORK/rush.out" | tail -n1)

# 5. Hostile clients, on a fresh server with the shipped rate limits (the
# benchmark's own config turns them off) and, for the login runs, the login
# limits off so that every login reaches the password hashers.
echo "== hostile clients"
start_server FLASHSALE__LIMITS__PER_IP_PER_SECOND=1000 FLASHSALE__LIMITS__PURCHASES_PER_USER_PER_SECOND=5 \
  FLASHSALE__LIMITS__LOGINS_PER_IP_PER_MINUTE=0 FLASHSALE__LIMITS__LOGINS_PER_USERNAME_PER_MINUTE=0
HOSTILE_SOLD=$(sale 1 1)
curl -sf -X POST "$BASE/api/v1/sales/$HOSTILE_SOLD/purchases" -H "Authorization: Bearer $(sed -n 3p "$WORK/few-tokens.txt")" >/dev/null || true
run_wrk limited-healthz "$SECONDS_SHORT" "$CONNECTIONS" -s load-tests/wrk/latency.lua "$BASE/healthz"
run_wrk limited-soldout "$SECONDS_SHORT" "$CONNECTIONS" -H "Authorization: Bearer $(sed -n 4p "$WORK/few-tokens.txt")" -s load-tests/wrk/post-body.lua "$BASE/api/v1/sales/$HOSTILE_SOLD/purchases"
run_wrk limited-unauth "$SECONDS_SHORT" "$CONNECTIONS" -s load-tests/wrk/post-body.lua "$BASE/api/v1/sales/$HOSTILE_SOLD/purchases"
run_wrk login "$SECONDS_SHORT" 8 -s load-tests/wrk/login.lua "$BASE/api/v1/sessions"
( while sleep 0.5; do ps -o rss= -p $SERVER_PID; done ) > "$WORK/login-rss.txt" &
RSS_PID=$!
run_wrk login-flood "$SECONDS_SHORT" 400 -s load-tests/wrk/login.lua "$BASE/api/v1/sessions"
kill $RSS_PID 2>/dev/null || true
stop_server
LOGIN_RSS=$(sort -n "$WORK/login-rss.txt" | tail -n1)

# 6. A big sale on a fresh server and database: BIG_UNITS units, one per
# buyer, sold to BIG_UNITS distinct buyers (bounded by BENCH_BIG_SECONDS).
# Memory is read once the pipeline is idle; then a graceful stop and a
# start, timed until /readyz answers 200 with every order read back.
echo "== big sale"
fresh_services
start_server
BIG=$(sale "$BIG_UNITS" 1)
sleep 1
BIG_RSS_BASE=$(ps -o rss= -p $SERVER_PID)
stock_left() { curl -sf "$BASE/api/v1/sales/$BIG" | python3 -c 'import sys,json; print(json.load(sys.stdin)["stock_left"])'; }
( while sleep 1; do ps -o rss= -p $SERVER_PID; done ) > "$WORK/big-rss.txt" &
RSS_PID=$!
BIG_START=$(date +%s.%N)
WRK_THREADS=$THREADS wrk -t"$THREADS" -c"$RESERVE_CONNECTIONS" -d"${BENCH_BIG_SECONDS:-300}s" --timeout 5s \
  -s load-tests/wrk/reserve.lua "$BASE" -- "/api/v1/sales/$BIG/purchases" "$WORK/tokens.txt" > "$WORK/big.out" 2>&1 &
WRK_PID=$!
while kill -0 $WRK_PID 2>/dev/null; do
  [ "$(stock_left)" = "0" ] && { kill -INT $WRK_PID 2>/dev/null || true; break; }
  sleep 1
done
wait $WRK_PID 2>/dev/null || true
BIG_SECS=$(python3 -c "print(f'{$(date +%s.%N) - $BIG_START:.0f}')")
BIG_SOLD=$(( BIG_UNITS - $(stock_left) ))
# Idle pipeline: the queue empty and the directory handed over to PostgreSQL.
for _ in $(seq 1 120); do
  DIR=$(curl -sf -H "$ADMIN" "$BASE/admin/v1/actors" | python3 -c 'import sys,json; p=json.load(sys.stdin)["pipeline"]; print(p["directory_orders"])')
  [ "${DIR:-1}" -lt 1000 ] && break; sleep 1
done
sleep 2
kill $RSS_PID 2>/dev/null || true
BIG_RSS_SOLD=$(ps -o rss= -p $SERVER_PID)
BIG_RSS_PEAK=$(sort -n "$WORK/big-rss.txt" | tail -n1)
BIG_IN_PLAY=$(curl -sf -H "$ADMIN" "$BASE/admin/v1/actors" | python3 -c "import sys,json; print([a for a in json.load(sys.stdin)['stock_actors'] if a['sale_id']=='$BIG'][0]['orders_in_play'])")
stop_server
BIG_STORED=$(psql -tA -h 127.0.0.1 -U postgres -d flashsale_bench -c "SELECT COUNT(*) FROM orders WHERE sale_id = '$BIG' AND status = 'reserved'")
RESTART_START=$(date +%s.%N)
start_server
BIG_RESTART=$(python3 -c "print(f'{$(date +%s.%N) - $RESTART_START:.1f}')")
sleep 1
BIG_RSS_RESTART=$(ps -o rss= -p $SERVER_PID)
stop_server
per_unit() { python3 -c "print(round(($1 - $BIG_RSS_BASE) * 1024 / max($BIG_SOLD, 1)))"; }

# 7. Live updates, on a fresh server with no per-address stream limit (every
# stream comes from 127.0.0.1): durable reservations without event streams,
# then with BENCH_STREAMS (default 10,000) streams of that sale open; memory
# per open stream; then the sale is sold out and every stream must show it.
echo "== event streams"
STREAMS=${BENCH_STREAMS:-10000}
STREAM_SECONDS=${BENCH_STREAM_SECONDS:-15}
fresh_services
start_server FLASHSALE__EVENTS__MAX_STREAMS_PER_IP=0
LIVE=$(sale 10000000 1)
# A buyer each for every purchase of a run (60k/s for 15 s fits in each).
sed -n '1,1200000p' "$WORK/tokens.txt" > "$WORK/tokens-a.txt"
sed -n '1200001,2400000p' "$WORK/tokens.txt" > "$WORK/tokens-b.txt"
sed -n '2400001,2500000p' "$WORK/tokens.txt" > "$WORK/tokens-c.txt"
run_wrk live-without "$STREAM_SECONDS" "$RESERVE_CONNECTIONS" -s load-tests/wrk/reserve.lua "$BASE" -- "/api/v1/sales/$LIVE/purchases" "$WORK/tokens-a.txt"
sleep 2
STREAM_RSS0=$(ps -o rss= -p $SERVER_PID)
target/release/flashsale-streams --addr "127.0.0.1:$PORT" --sale "$LIVE" --count "$STREAMS" \
  --seconds $(( STREAM_SECONDS * 2 + 60 )) --out "$WORK/streams.json" > "$WORK/streams.out" 2>&1 &
SSE_PID=$!
for _ in $(seq 1 600); do grep -q '^open' "$WORK/streams.out" && break; sleep 0.1; done
sleep 2
STREAMS_OPEN=$(awk '/^open/ {print $2}' "$WORK/streams.out")
STREAM_RSS1=$(ps -o rss= -p $SERVER_PID)
run_wrk live-with "$STREAM_SECONDS" "$RESERVE_CONNECTIONS" -s load-tests/wrk/reserve.lua "$BASE" -- "/api/v1/sales/$LIVE/purchases" "$WORK/tokens-b.txt"
STREAM_RSS2=$(ps -o rss= -p $SERVER_PID)
# Sell the sale out: its stock down to what is held plus 2,000, then buyers
# until none is left; every stream should show it within a second.
HELD=$(curl -sf -H "$ADMIN" "$BASE/admin/v1/sales/$LIVE" | python3 -c 'import sys,json; s=json.load(sys.stdin); print(s["stock_total"]-s["stock_left"])')
curl -sf -X PATCH "$BASE/admin/v1/sales/$LIVE" -H "$ADMIN" -H 'content-type: application/json' -d "{\"stock_total\": $(( HELD + 2000 ))}" >/dev/null
run_wrk live-sellout 5 "$RESERVE_CONNECTIONS" -s load-tests/wrk/reserve.lua "$BASE" -- "/api/v1/sales/$LIVE/purchases" "$WORK/tokens-c.txt"
sleep 3
kill -TERM $SSE_PID 2>/dev/null || true; wait $SSE_PID 2>/dev/null || true
stop_server
live_201() { python3 -c "print(round($(created "$1") / $STREAM_SECONDS))"; }
LIVE_R0=$(live_201 live-without); LIVE_R1=$(live_201 live-with)
STREAM_SUMMARY=$(python3 -c "
import json
s = json.load(open('$WORK/streams.json'))
lag = lambda v: 'n/a' if v is None else f'{v:.2f} s'
print(f\"{s['saw_sold_out']} of {s['requested']} streams showed the sale sold out (max {lag(s['max_lag_s'])}, median {lag(s['median_lag_s'])} after GET /api/v1/sales/{{id}} first said so); {s['errors']} failed to open; {s['events']} events read in all\")")

# The later steps run in services mode; their ratios are to its /healthz.
H=$(rps services-healthz)
mkdir -p load-tests/reports
REPORT=load-tests/reports/bench-$(date -u +%Y%m%dT%H%M%SZ).md
{
  echo "# flashsale benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; server and wrk on the same machine."
  echo "Tool: wrk, $THREADS thread(s); $CONNECTIONS connections for /healthz and the sold-out run, $RESERVE_CONNECTIONS for the reservation run; every figure from this one run."
  echo "$(broker_line)"
  echo
  core_report
  echo "- The steps below run in services mode."
  echo
  echo "## Hostile clients (shipped rate limits on: 1,000 requests/s per IP, 5 purchases/s per buyer)"
  echo
  echo "| run | seconds | req/s | ratio to /healthz of this server | p99 ms |"
  echo "| --- | --- | --- | --- | --- |"
  LH=$(rps limited-healthz)
  echo "| GET /healthz | $SECONDS_SHORT | $LH | 1.00 | $(field limited-healthz p99_ms) |"
  echo "| sold-out sale, one buyer, with a body | $SECONDS_SHORT | $(rps limited-soldout) | $(ratio "$(rps limited-soldout)" "$LH") | $(field limited-soldout p99_ms) |"
  echo "| purchase without a token, with a body | $SECONDS_SHORT | $(rps limited-unauth) | $(ratio "$(rps limited-unauth)" "$LH") | $(field limited-unauth p99_ms) |"
  echo
  echo "- Refusals (non-2xx): $(non2xx limited-soldout) of $(field limited-soldout requests) in the sold-out storm (409, then 429 past the buyer's and the address's quota), $(non2xx limited-unauth) of $(field limited-unauth requests) in the unauthenticated flood (401, then 429). Connect errors: $(field limited-soldout connect_errors) and $(field limited-unauth connect_errors) (a refusal keeps its connection alive)."
  echo "- Logins of an unknown user, 8 at a time ($SECONDS_SHORT s): $(rps login) answers/s, p50 $(field login p50_ms) ms, p99 $(field login p99_ms) ms: the password-hashing capacity at the shipped argon2 cost (\`auth.argon2_*\`, \`auth.password_hash_threads\` = cores)."
  echo "- The same with 400 at a time: $(rps login-flood) answers/s (the excess is shed with 503 \`overloaded\` at once); server resident memory peak $(( ${LOGIN_RSS:-0} / 1024 )) MiB."
  echo
  echo "## Rush (goose, throttled to ${BENCH_RUSH_THROTTLE:-15000} requests/s, 256 users, $RUSH_SECONDS s, 100,000 distinct buyers, 50,000 units)"
  echo
  echo "- Invariant check: ${RUSH_RESULT:-no result (exit $RUSH_RC)}"
  echo "- Server resident memory peak during the rush: $(( ${RUSH_RSS:-0} / 1024 )) MiB."
  echo "- goose's own tables (requests/s, percentiles) follow. goose counts every non-2xx as an error in its error table, before the scenario marks 409/429/503 as the normal answers they are."
  echo
  sed -n '/Request Metrics/,$p' "$WORK/rush.md" 2>/dev/null | head -n 60
  echo
  echo "## A big sale ($BIG_UNITS units, one per buyer, $BIG_UNITS distinct buyers)"
  echo
  echo "- Sold $BIG_SOLD units in $BIG_SECS s; PostgreSQL holds $BIG_STORED reserved orders of it. Every order stays reserved (nobody pays), so the stock actor keeps each whole for its deadline: the largest book a sale of this size can have ($BIG_IN_PLAY orders in play when measured)."
  echo "- Server resident memory: $(( ${BIG_RSS_BASE:-0} / 1024 )) MiB before the sale, $(( ${BIG_RSS_SOLD:-0} / 1024 )) MiB once sold out and the pipeline idle, peak $(( ${BIG_RSS_PEAK:-0} / 1024 )) MiB: **$(per_unit "${BIG_RSS_SOLD:-0}") bytes per sold unit** once idle ($(per_unit "${BIG_RSS_PEAK:-0}") at the peak)."
  echo "- Restart with all of it in PostgreSQL (graceful stop, start, until /readyz answers 200): $BIG_RESTART s; resident memory after it $(( ${BIG_RSS_RESTART:-0} / 1024 )) MiB ($(per_unit "${BIG_RSS_RESTART:-0}") bytes per sold unit)."
  echo
  echo "## Live updates (${STREAMS_OPEN:-0} event streams of one sale, from one address)"
  echo
  echo "| run | seconds | durable reservations/s | ratio to /healthz |"
  echo "| --- | --- | --- | --- |"
  echo "| without event streams | $STREAM_SECONDS | $LIVE_R0 | $(ratio "$LIVE_R0" "$H") |"
  echo "| with ${STREAMS_OPEN:-0} streams of the sale open | $STREAM_SECONDS | $LIVE_R1 | $(ratio "$LIVE_R1" "$H") |"
  echo
  echo "- With the streams open the rate is $(ratio "$LIVE_R1" "$LIVE_R0") of the rate without them (target: within 10%)."
  echo "- Server resident memory: $(( ${STREAM_RSS0:-0} / 1024 )) MiB before the streams, $(( ${STREAM_RSS1:-0} / 1024 )) MiB with them open: **$(python3 -c "print(round((${STREAM_RSS1:-0} - ${STREAM_RSS0:-0}) * 1024 / max(${STREAMS_OPEN:-0}, 1)))") bytes per open stream** (target: 16 KiB); $(( ${STREAM_RSS2:-0} / 1024 )) MiB after the reservation run with them."
  echo "- Sell-out: $STREAM_SUMMARY (target: every stream within 1 s)."
} > "$REPORT"
cat "$REPORT"
for m in embedded services; do
  [ "${STORED[$m]}" -ge "${CREATED[$m]}" ] || { echo "bench: $m: only ${STORED[$m]} orders in the store but ${CREATED[$m]} were answered 201" >&2; exit 1; }
done
[ "$RUSH_RC" -eq 0 ] || { echo "bench: the rush's invariant check failed" >&2; exit 1; }
