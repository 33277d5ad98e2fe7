#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers (fuzz/fuzz_parsers.py, atheris), one target after
# the other (never two fuzzers at once), at nice 19.
#   scripts/fuzz.sh [--runs N] [--target T] [--corpus DIR] [--artifacts DIR] [--max-len B]
# --runs is per target (default 125000: 1,000,000 inputs over the 8 targets); --target
# may be given more than once. Installs atheris (the `fuzz` extra) into .venv if missing.
# A crash stops that target's run, leaves the input as crash-<sha1> in the artifact
# directory, and makes the script exit 1 after the other targets ran.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=125000
targets=()
corpus=${FUZZ_CORPUS:-fuzz/corpus}
artifacts=${FUZZ_ARTIFACTS:-/var/tmp/replicator-fuzz-artifacts}
max_len=4096
while (($#)); do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --target) targets+=("$2"); shift 2 ;;
        --corpus) corpus=$2; shift 2 ;;
        --artifacts) artifacts=$2; shift 2 ;;
        --max-len) max_len=$2; shift 2 ;;
        -h|--help) sed -n 2,8p "$0"; exit 0 ;;
        *) echo "fuzz.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

PY=.venv/bin/python
[[ -x $PY ]] || PY=python3
if ! "$PY" -c "import atheris" 2>/dev/null; then
    echo "fuzz.sh: installing atheris into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install -q 'atheris>=2.3'
fi
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <("$PY" fuzz/fuzz_parsers.py --list)
fi
mkdir -p "$artifacts"
echo "fuzz.sh: crash artifacts go to $artifacts/<target>/"
failed=()
for target in "${targets[@]}"; do
    dir=$corpus/$target
    mkdir -p "$dir" "$artifacts/$target"
    "$PY" fuzz/fuzz_parsers.py --seeds "$target" "$dir" 2>/dev/null \
        || { echo "fuzz.sh: cannot write the seeds of $target" >&2; exit 2; }
    echo "fuzz.sh: $target: $runs inputs, corpus $dir"
    start=$(date +%s)
    log=$artifacts/$target/fuzz.log
    if nice -n 19 "$PY" fuzz/fuzz_parsers.py "$target" -runs="$runs" -max_len="$max_len" \
            -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
            -artifact_prefix="$artifacts/$target/" "$dir" >"$log" 2>&1; then
        status=ok
    else
        status="CRASH (see $log)"
        failed+=("$target")
    fi
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
    execs=$(grep -Eo 'stat::number_of_executed_units: [0-9]+' "$log" | grep -Eo '[0-9]+$' || true)
    echo "fuzz.sh: $target: $status, ${execs:-?} inputs in $(( $(date +%s) - start ))s, ${cov:-no coverage line}"
done
if ((${#failed[@]})); then
    echo "fuzz.sh: crashes in: ${failed[*]} (inputs in $artifacts)" >&2
    exit 1
fi
