#!/usr/bin/env bash
# A/B runs of throughput knobs: steps 1-3 of bench.sh in services mode
# (fresh database and queues, /healthz, the sold-out storm, durable
# reservations with the CPU samplers), once per variant and round, the
# variants alternated so that the machine's drift falls on all of them
# alike. Tokens are minted once for every run.
#
#   load-tests/ab.sh NAME[:VAR=value[,VAR=value...]] ...
#
# VAR is any FLASHSALE__* override of the server or a BENCH_* setting of
# bench.sh (BENCH_RESERVE_CONNECTIONS, say); a NAME alone is the shipped
# configuration. AB_ROUNDS (default 2) rounds, AB_SECONDS (default 16)
# seconds of reservations per run, AB_HEALTHZ_SECONDS (default 5) of
# /healthz. Prints one row per run, each ratio to the /healthz of its own
# run, and the median per variant; the runs' reports stay in AB_OUT
# (default a new temporary directory). The steal column is the share of the
# machine's time that the hypervisor gave to other guests during the run: a
# run with much of it measured a slower machine.
#
# Example: load-tests/ab.sh shipped d1000:FLASHSALE__RABBITMQ__BATCH_MAX_DELAY_US=1000
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 1 ] || { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
ROUNDS=${AB_ROUNDS:-2}
SECS=${AB_SECONDS:-16}
OUT=${AB_OUT:-$(mktemp -d)}
mkdir -p "$OUT"

scripts/services
cargo build --release -q -p flashsale -p flashsale-load-tests
# bench.sh's reservation and step-7 runs want at least this many buyers.
TOKENS=$(( SECS * 90000 ))
[ "$TOKENS" -ge 2500000 ] || TOKENS=2500000
target/release/flashsale-mint --config load-tests/bench.toml --count "$TOKENS" --out "$OUT/tokens.txt"

row() { # report-file -> "healthz 201/s ratio p50 p99 cpu-line entries"
  python3 - "$1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
h = re.search(r"\| services \| GET /healthz \(ceiling\) \| \d+ \| ([\d.]+) \|", t)
r = re.search(r"\| services \| purchase, ample stock \(all answers\) \| \d+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \|", t)
d = re.search(r"= \*\*(\d+)/s\*\* \(([\d.]+) of /healthz\)", t)
c = re.search(r"server \d+% \((\d+) µs\), PostgreSQL \d+% \((\d+) µs\), RabbitMQ \d+% \((\d+) µs\), wrk \d+% \((\d+) µs\); (\d+)% of .*?, (\d+) µs of CPU", t)
b = re.search(r"batches of ([\d.]+) entries", t)
st = re.search(r"steal (\d+)%", t)
if not (h and r and d):
    print("| failed | | | | | | | |")
else:
    cpu = f"{c[6]} ({c[1]}/{c[2]}/{c[3]}/{c[4]}), {c[5]}% busy" if c else "not sampled"
    print(f"| {float(h[1]):.0f} | {d[1]} | {d[2]} | {r[1]} | {r[2]} | {cpu} | {b[1] if b else '-'} | {st[1] + '%' if st else '-'} |")
PY
}

echo "| variant | round | /healthz req/s | 201/s | ratio | p50 ms | p99 ms | CPU µs per 201 (server/PG/MQ/wrk) | entries per message | steal |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for round in $(seq 1 "$ROUNDS"); do
  for variant in "$@"; do
    name=${variant%%:*}
    vars=()
    [ "$name" = "$variant" ] || IFS=, read -r -a vars <<< "${variant#*:}"
    report="$OUT/$name-$round.md"
    env BENCH_SWEEP_CONNECTIONS= BENCH_PAIRS=0 "${vars[@]}" BENCH_CORE_ONLY=1 BENCH_MODES=services BENCH_TOKENS="$OUT/tokens.txt" \
      BENCH_SECONDS="${AB_HEALTHZ_SECONDS:-5}" BENCH_RESERVE_SECONDS="$SECS" \
      load-tests/bench.sh > "$OUT/$name-$round.log" 2>&1 || true
    sed -n '/^Each storage mode/,$p' "$OUT/$name-$round.log" > "$report"
    echo "| $name | $round $(row "$report")"
  done
done | tee "$OUT/runs.md"

echo
echo "Median per variant:"
python3 - "$OUT/runs.md" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) < 7 or cells[0] in ("variant", "---") or cells[2] == "failed":
        continue
    runs.setdefault(cells[0], []).append((float(cells[4]), float(cells[6])))
for name, rs in runs.items():
    print(f"- {name}: ratio {statistics.median(r for r, _ in rs):.3f}, p99 {statistics.median(p for _, p in rs):.1f} ms ({len(rs)} runs)")
PY
echo "(reports in $OUT)"
