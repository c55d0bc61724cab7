#!/usr/bin/env bash
# Run `python -m bench` on a GPU host that has torch but none of radq's other dependencies
# and no Redis (the lent NVIDIA H200: Python 3.12, no network), from the repository root:
#
#   bash scripts/gpu_bench.sh              # the GPU matrix: 343 s on 16 cores + H200 (2026-12-04)
#   QUICK=1 bash scripts/gpu_bench.sh      # smoke run (radq-smoke, 3 s per figure), about 1 minute
#
# Needs, beside the tracked files: .whl/ (the wheels of radq's runtime dependencies the host
# lacks, for its Python) and .redis/ (a redis-server with the libraries a stock Ubuntu may
# lack). Both are git-ignored (.git/info/exclude) and made by `bash scripts/gpu_carry.sh`: name
# them in the device tool's `carry`.
#
# Leaves in $OUT (default bench/results/gpu): gpu.json (the bench's report), bench.log (what
# it printed, the table included), env.txt (versions, nvidia-smi, timings), gpu_util.csv
# (nvidia-smi every second), worker.log (the stack's worker log, which the bench keeps
# in a temporary folder it deletes; hard-linked while it runs). Exit code: the bench's.
#
# Knobs (environment): QUICK, PYTEST (pytest arguments run first, e.g. the GPU decode tests),
# SECOND and SECOND_BUDGET (a second measurement, step 6), OUT, WHEELS (.whl), SITE (/tmp/site), PY (python3), PIP_PY ($PY),
# WORK (/tmp/radq-gpubench), REDIS_PORT (6379), RADQ_DEVICE (cuda), RADQ_BATCH_SIZE (64 on
# CUDA), MODELS, INPUTS, SECONDS_PER_FIGURE, MAX_IMAGES, CACHE, PIPELINE_TIMEOUT (--timeout),
# BENCH_TIMEOUT (seconds before the bench is stopped), BENCH_ARGS (more bench arguments).
#
# Validated on a CPU host with a Python 3.11 copy of the wheels, e.g.:
#   QUICK=1 RADQ_DEVICE=cpu WHEELS=/tmp/whl311 SITE=/tmp/site311 REDIS_PORT=6398 bash scripts/gpu_bench.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
T0=$SECONDS
QUICK=${QUICK:-0}
OUT=${OUT:-$ROOT/bench/results/gpu}
WHEELS=${WHEELS:-$ROOT/.whl}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
PIP_PY=${PIP_PY:-$PY}
WORK=${WORK:-/tmp/radq-gpubench}
REDIS_PORT=${REDIS_PORT:-6379}
export RADQ_DEVICE=${RADQ_DEVICE:-cuda}
if [[ $RADQ_DEVICE == cuda* ]]; then
    export RADQ_BATCH_SIZE=${RADQ_BATCH_SIZE:-64}
fi
export RADQ_BROKER_URL=${RADQ_BROKER_URL:-redis://127.0.0.1:$REDIS_PORT/0}
export PYTHONUNBUFFERED=1
INPUTS=${INPUTS:-ct,cr,cr-j2k,cr-ljpeg}  # cr-jls needs pyjpegls (+ pylibjpeg-libjpeg) in $WHEELS
if [[ $QUICK == 1 ]]; then
    MODELS=${MODELS:-radq-smoke}
    SECONDS_PER_FIGURE=${SECONDS_PER_FIGURE:-3}
    MAX_IMAGES=${MAX_IMAGES:-256}
    BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
    PIPELINE_TIMEOUT=${PIPELINE_TIMEOUT:-90}
else
    MODELS=${MODELS:-headct-resnet18,densenet121-ct,chexnet-densenet121}
    SECONDS_PER_FIGURE=${SECONDS_PER_FIGURE:-10}
    MAX_IMAGES=${MAX_IMAGES:-6000}
    BENCH_TIMEOUT=${BENCH_TIMEOUT:-450}
    PIPELINE_TIMEOUT=${PIPELINE_TIMEOUT:-150}
fi
CACHE=${CACHE:-$WORK/cache}

mkdir -p "$OUT" "$WORK/tmp" "$WORK/logs"
rm -f "$WORK"/logs/*
ENV_TXT=$OUT/env.txt
: >"$ENV_TXT"
say() { echo "[gpu_bench +$((SECONDS - T0))s] $*" | tee -a "$ENV_TXT"; }

pids=()
redis_pid_file=""
# shellcheck disable=SC2317  # (run by the trap)
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ -n $redis_pid_file && -s $redis_pid_file ]]; then
        kill "$(cat "$redis_pid_file")" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# 1. The wheels, into $SITE; radq itself runs from this checkout (not installed).
wheels=("$WHEELS"/*.whl)
say "installing ${#wheels[@]} wheels from $WHEELS into $SITE"
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore "$PIP_PY" -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" >"$WORK/pip.log" 2>&1 ||
    { tee -a "$ENV_TXT" <"$WORK/pip.log"; say "pip install failed"; exit 3; }
export PYTHONPATH="$ROOT:$SITE"
say "checking imports"
"$PY" -c 'import radq.cli, api.app, workers.app, bench.__main__, celery.bin.celery, kombu.transport.redis, uvicorn, pydicom, pylibjpeg, openjpeg, imagecodecs._jpeg8, imagecodecs._jpeg2k' 2>&1 |
    tee -a "$ENV_TXT" || { say "an import failed: a wheel is missing from $WHEELS"; exit 3; }

# 1b. Optional: tests that need this host's GPU (PYTEST: pytest arguments), output in $OUT/pytest.log.
if [[ -n ${PYTEST:-} ]]; then
    say "pytest $PYTEST"
    set +e
    # shellcheck disable=SC2086
    timeout -k 10 "${PYTEST_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider -rs $PYTEST >"$OUT/pytest.log" 2>&1
    say "pytest exited with $? ($(tail -1 "$OUT/pytest.log"))"
    set -e
fi

# 2. Redis on 127.0.0.1:$REDIS_PORT, no persistence, unless one answers there already.
redis_up() {
    "$PY" -c 'import sys, redis; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()' \
        "$RADQ_BROKER_URL" 2>/dev/null
}
if [[ -d $ROOT/.redis ]]; then
    rm -rf "$WORK/redis" && cp -r "$ROOT/.redis" "$WORK/redis" && chmod +x "$WORK/redis/redis-server" "$WORK/redis/lib/redis-server"
    export PATH="$WORK/redis:$PATH"  # also for radq.services.ensure_redis
fi
if redis_up; then
    say "Redis answers at $RADQ_BROKER_URL already"
else
    if ! command -v redis-server >/dev/null; then
        say "no redis-server (carry .redis)"; exit 3
    fi
    if [[ -x $WORK/redis/lib/redis-server ]]; then
        missing=$(LD_LIBRARY_PATH="$WORK/redis/lib" ldd "$WORK/redis/lib/redis-server" 2>&1 | grep 'not found' || true)
        [[ -z $missing ]] || say "the carried redis-server lacks libraries: $missing"
    fi
    redis_pid_file=$WORK/redis.pid
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --pidfile "$redis_pid_file" --dir "$WORK" --logfile "$WORK/redis.log"
    for _ in $(seq 50); do redis_up && break; sleep 0.2; done
    if ! redis_up; then
        say "redis-server did not answer:"; tail -20 "$WORK/redis.log" | tee -a "$ENV_TXT"; exit 3
    fi
    say "started $(redis-server --version | cut -d' ' -f1-3) on port $REDIS_PORT"
fi

# 3. What this host is.
{
    echo "== uname: $(uname -a)"
    echo "== cores: $(nproc), memory: $(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    if command -v nvidia-smi >/dev/null; then nvidia-smi || true; fi
    "$PY" - <<'EOF'
import sys, torch
from importlib.metadata import version
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("numpy", "pydicom", "pylibjpeg-openjpeg", "imagecodecs", "pillow", "celery", "kombu", "redis", "sqlalchemy",
             "fastapi", "starlette", "uvicorn", "pydantic", "typer", "click", "rich", "httpx", "anyio"):
    try:
        print(f"{name} {version(name)}")
    except Exception as exc:
        print(f"{name} ? ({exc})")
EOF
    echo "== environment"
    env | grep -E '^(RADQ_|PYTHONPATH=|CUDA_)' | sort
} 2>&1 | tee -a "$ENV_TXT"

# 4. Background: GPU samples every second; hard links to the stack's logs before the bench
# deletes its temporary folder (a link keeps every later line: the files are appended to),
# copied into $OUT every 10 s too, in case this script is killed before its end.
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 >"$OUT/gpu_util.csv" 2>&1 &
    pids+=($!)
fi
export TMPDIR=$WORK/tmp
copy_logs() {
    local f
    for f in "$WORK"/logs/worker*.log; do
        # At most 16 MiB comes back per file: keep the end.
        if [[ -e $f ]]; then tail -c 16000000 "$f" >"$OUT/${f##*/}" || true; fi
    done
}
(
    n=0
    while :; do
        for f in "$TMPDIR"/radq-bench-*/home/logs/*.log "$TMPDIR"/radq-scaling-*/*/logs/*.log; do
            if [[ -e $f && ! -e $WORK/logs/${f##*/} ]]; then ln "$f" "$WORK/logs/${f##*/}" 2>/dev/null || true; fi
        done
        if (((n += 1) % 10 == 0)); then copy_logs; fi
        sleep 1
    done
) &
linker=$!
pids+=("$linker")

# Optional: where the worker's Python threads spend their time while the first pipeline job runs
# (py-spy, carried as a wheel in $WHEELS by `PROFILE=1 bash scripts/gpu_carry.sh`): $OUT/worker-profile.txt.
if [[ -x $SITE/bin/py-spy ]]; then
    (
        until grep -q "pipeline," "$OUT/bench.log" 2>/dev/null; do sleep 0.5; done
        sleep 2
        pid=$(pgrep -f "radq.cli worker" | head -1)
        # --gil: only the thread holding the GIL, i.e. what serialises the worker's Python.
        [[ -n $pid ]] && "$SITE/bin/py-spy" record --pid "$pid" --duration 6 --threads --gil --nonblocking \
            --format raw -o "$OUT/worker-profile.txt" >"$WORK/py-spy.log" 2>&1
    ) &
    pids+=($!)
fi

# 5. The bench.
args=(--models "$MODELS" --inputs "$INPUTS" --seconds "$SECONDS_PER_FIGURE" --max-images "$MAX_IMAGES"
      --cache "$CACHE" --out "$OUT/gpu.json" --timeout "$PIPELINE_TIMEOUT")
if [[ $QUICK == 1 ]]; then args+=(--quick); fi
# shellcheck disable=SC2206
args+=(${BENCH_ARGS:-})
say "python -m bench ${args[*]} (stopped after ${BENCH_TIMEOUT}s)"
set +e
timeout -k 30 "$BENCH_TIMEOUT" "$PY" -m bench "${args[@]}" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
set -e
say "bench exited with $rc"

# 6. Where time is left (SECOND_BUDGET seconds of the script's whole run), a second
# measurement of the first model and input, output in $OUT/second.log (and .json):
#   SECOND=variant       the same bench with VARIANT_ENV's settings (default: more messages in
#                        hand, larger chunks: RADQ_WORKER_CONCURRENCY=4 RADQ_CHUNK_SIZE=256; e.g.
#                        RADQ_HOST_PREPROCESS_PIXELS=1048576 for CR finished in the decoders)
#   SECOND=scaling:1,2,4 python -m bench.scaling: that many worker processes sharing the GPU
#                        (each with its share of the cores), SQLite
SECOND_BUDGET=${SECOND_BUDGET:-0}
SECOND=${SECOND:-variant}
if ((SECONDS - T0 < SECOND_BUDGET)); then
    left=$((SECOND_BUDGET - SECONDS + T0))
    set +e
    if [[ $SECOND == scaling:* ]]; then
        sargs=(--workers "${SECOND#scaling:}" --layouts split --model "${MODELS%%,*}" --input "${INPUTS%%,*}"
               --images "$MAX_IMAGES" --database sqlite --cache "$CACHE" --timeout "$PIPELINE_TIMEOUT")
        say "second: python -m bench.scaling ${sargs[*]}"
        timeout -k 30 "$left" "$PY" -m bench.scaling "${sargs[@]}" >"$OUT/second.log" 2>&1
    else
        vargs=(--models "${MODELS%%,*}" --inputs "${INPUTS%%,*}" --seconds "$SECONDS_PER_FIGURE"
               --max-images "$MAX_IMAGES" --cache "$CACHE" --out "$OUT/second.json" --timeout "$PIPELINE_TIMEOUT")
        variant=${VARIANT_ENV:-RADQ_WORKER_CONCURRENCY=4 RADQ_CHUNK_SIZE=256}
        say "second: $variant python -m bench ${vargs[*]}"
        # shellcheck disable=SC2086  # VARIANT_ENV: NAME=value words
        env $variant timeout -k 30 "$left" "$PY" -m bench "${vargs[@]}" >"$OUT/second.log" 2>&1
    fi
    say "second exited with $?"
    set -e
fi
kill "$linker" 2>/dev/null || true  # the log linker: no copy of its own from now on
wait "$linker" 2>/dev/null || true
copy_logs
say "done; files in $OUT: $(cd "$OUT" && echo *)"
exit "$rc"
