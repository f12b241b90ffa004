#!/usr/bin/env bash
# The GPU run in one command: every stage of the gpu preset with its export, evaluate.py on 200
# held-out pairs, then bench.py --gpu-check; everything docs/gpu.md reports lands in OUT.
#
#   bash tools/gpu_run.sh OUT                    # one GPU: about nine minutes in all
#   N=8 bash tools/gpu_run.sh OUT --smoke=true   # its rehearsal on a CPU: the same steps, tiny sizes
#
# Extra arguments go to train.py. Each phase has a time limit of its own, so that a slow one
# cannot take the others' time, and what a phase wrote stays in OUT if a later one fails.
# OUT ends with the export in 16 MiB parts (what a transfer off the machine takes; join them
# with `cat difffae-gpu.pt.part-* > difffae-gpu.pt` and check SHA256SUMS), the results grid and
# logs.tar.gz (the logs, measurements and held-out pictures of every phase).
set -uo pipefail
out=$(realpath -m "${1:?usage: bash tools/gpu_run.sh OUT [train.py options]}")
shift
cd "$(dirname "$0")/.."
runs=runs/gpu-run
logs=$runs/logs  # packed into OUT/logs.tar.gz after every phase, so a cut run keeps them
mkdir -p "$out" "$logs"
note() { echo "[$(date +%T)] $*" | tee -a "$logs/run.log"; }
pack() {
    cp "$runs"/*/log.jsonl --parents "$logs/" 2>/dev/null
    for stage in "$runs"/*/; do  # the last held-out picture of every stage
        last=$(ls "$stage"eval_*.png 2>/dev/null | tail -1)
        [ -n "$last" ] && cp --parents "$last" "$logs/"
    done
    tar czf "$out/logs.tar.gz" -C "$logs" .
}

{ nvidia-smi; nproc; free -g; python3 -c "import torch; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
} > "$logs/machine.txt" 2>&1
note "machine: $(tail -1 "$logs/machine.txt")"

started=$SECONDS
model=$PWD/$runs/difffae-gpu.pt
timeout 400 python3 train.py --stage all --preset gpu --out="$runs" \
    --export="$model" "$@" > "$logs/train.log" 2>&1
status=$?
note "train.py --stage all: exit $status after $((SECONDS - started)) s"
pack
if [ ! -e "$model" ] && [ -e "$runs/ldm/ckpt.pt" ]; then  # cut short: the last
    python3 train.py --stage ldm --preset gpu --out="$runs" \
        --export="$model" "$@" >> "$logs/train.log" 2>&1  # checkpoint's
    note "export of the last ldm checkpoint: exit $?"
fi

device=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ -e "$model" ]; then
    (cd "$out" && split -b 16M -d "$model" difffae-gpu.pt.part- \
        && sha256sum "$model" | sed 's|  .*/|  |' > SHA256SUMS)
    started=$SECONDS
    timeout 80 python3 -m tools.evaluate --ckpt "$model" --n "${N:-200}" \
        --device "$device" --json "$logs/results.json" --grid "$out/results_grid.png" \
        > "$logs/evaluate.log" 2>&1
    note "evaluate.py: exit $? after $((SECONDS - started)) s"
    pack
fi

started=$SECONDS
timeout 90 python3 -m tools.bench --gpu-check --out "$runs/check" > "$logs/gpu_check.md" 2>&1
note "bench.py --gpu-check: exit $? after $((SECONDS - started)) s"

pack
ls -l "$out"
