#!/usr/bin/env bash
# The reference setting on a GPU: configs/mnist_paper.yaml end to end on one GPU (the reference UNet, T = 1000, 1000-step
# ancestral sampling, 30 rounds x 10 samples, batch 1, every timestep), in invocations of BUDGET_S seconds each.
#
#   # once, on a machine with the data (MNIST as four gzipped IDX files, 11 MB), for a GPU machine that has none:
#   .venv/bin/python -m papa.data export mnist data/mnist    # then copy data/mnist to the GPU machine's checkout
#   # then, on the GPU machine, repeated until it prints DONE (each invocation continues where the last one stopped,
#   # as long as runs/ is kept between them):
#   OUT=gpu_out bash scripts/gpu_paper_run.sh
#
# 1. Pretrains the reference UNet (it is not shipped) for PRETRAIN_STEPS steps with the recipe's cosine schedule over
#    that many steps (default 6000 of the recipe's 37500, to keep one GPU run within half an hour;
#    the base's own rate and FID are the round-0 evaluation, so its quality is measured, not assumed). Resumable.
# 2. Runs `python -m papa.train --config configs/mnist_paper.yaml` on it (round checkpoints; resumed when killed).
# Writes env.txt, timings.txt, the pretraining log and the run's log, metrics, summary and curves under $OUT.
# BUDGET_S (default 540) bounds one call; a phase that would run past it is killed (SIGKILL is safe: both resume).
# EXTRA_SETS adds `--set KEY=VALUE` overrides (tests/test_shipping.py runs this script on CPU with a tiny model).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-540}
STEPS=${PRETRAIN_STEPS:-6000}
DATA=${DATA_ROOT:-data/mnist}
PY=${PYTHON:-python}
CFG=configs/mnist_paper.yaml
RUNS=${RUNS_DIR:-runs}
PT=$RUNS/pretrain/mnist_paper_${STEPS}
BASE=$PT/base_ddpm_reference.pt
RUN=$RUNS/mnist_paper/papa_gpu_base${STEPS}
SETS=(--set "data.root=$DATA" --set "checkpoints.base=$BASE" --set "train.output_dir=$RUNS" ${EXTRA_SETS:-})
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
stamp() { echo "$(date -u +%FT%TZ) $*" | tee -a "$OUT/timings.txt"; }
collect() {
  cp -f "$PT/log.txt" "$OUT/pretrain_log.txt" 2>/dev/null
  cp -f "${BASE%.pt}.json" "$OUT/base_ddpm_reference.json" 2>/dev/null
  for f in config.yaml log.txt metrics.jsonl metrics.csv summary.md curves.png; do
    cp -f "$RUN/$f" "$OUT/run_$f" 2>/dev/null
  done
}
trap collect EXIT
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
[ -d "$DATA" ] || { echo "error: no MNIST IDX files at $DATA; run '.venv/bin/python -m papa.data export mnist $DATA'" \
  "on a machine with the data and copy $DATA here (or set DATA_ROOT)" >&2; exit 2; }

if [ ! -f "$BASE" ]; then
  resume=(); [ -f "$PT/state.pt" ] && resume=(--resume)
  stamp "pretrain: ${STEPS} steps, ${resume[*]:-fresh}, $(left) s left"
  timeout -s KILL "$(left)" $PY -m papa.pretrain --config "$CFG" "${SETS[@]}" --set "pretrain.steps=$STEPS" \
    --out "$PT" "${resume[@]}" > "$OUT/pretrain_stdout.txt" 2>&1
  rc=$?
  stamp "pretrain: exit $rc"
  [ -f "$BASE" ] || { echo "CONTINUE: pretraining not finished (exit $rc); run this again"; exit 0; }
fi

if [ ! -f "$RUN/summary.md" ]; then
  if compgen -G "$RUN/checkpoints/round_*.pt" > /dev/null; then args=(--resume "$RUN")
  else args=(--config "$CFG" "${SETS[@]}" --set "train.sample_path=$(basename "$RUN")" --overwrite); fi
  stamp "train: ${args[0]}, $(left) s left"
  timeout -s KILL "$(left)" $PY -m papa.train "${args[@]}" > "$OUT/train_stdout.txt" 2>&1
  rc=$?
  stamp "train: exit $rc"
  tail -5 "$OUT/train_stdout.txt"
  [ -f "$RUN/summary.md" ] || { echo "CONTINUE: the run is not finished (exit $rc); run this again"; exit 0; }
fi
stamp "DONE: $RUN"
cat "$RUN/summary.md"
