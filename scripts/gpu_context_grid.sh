#!/usr/bin/env bash
# Issue 22 on one GPU in one go: the cost of making a compressed context on CUDA, the 40-prompt
# query-agnostic grid of every method at 10/5/2 % (reconstruct, and the gate for snapkv/uncomp),
# multi-query on the held-out wording, and the selection variants on the development set — the
# evaluations as parallel processes (each is bound by Python's per-step overhead, not the GPU).
#
#   HAYSTACK=../shared/data/haystack OUT=/tmp/gpu bash scripts/gpu_context_grid.sh
#
# Needs: the model (UNCOMP_MODEL, default the embedded one), a CUDA device, ~16 CPU cores. Each
# job's results land under $OUT/res (eval folders, JSON lines, logs); jobs stop at $DEADLINE
# seconds so a slow machine still returns what finished. On an H200 (2026-12-04) a re-read 40-prompt
# grid job needs more than 330 s (docs/results.md, "On a GPU"); the development jobs took ~300 s.
#
# How it ran on this workplace's device tool (64 MiB a call, a bare machine): the embedded GGUF
# (98 MB) split in two ignored parts carried by two back-to-back calls and joined in /tmp; the
# transformers and gguf wheels installed with --target; the haystack, the cached profile and the
# cached gate copied into an ignored folder and carried; UNCOMP_MODEL and UNCOMP_CACHE pointed at them.
set -u
: "${HAYSTACK:?set HAYSTACK to the haystack folder}" "${OUT:?set OUT to a folder for results}"
# Sized for one 10-minute call: ~1 min to load, the jobs, then the two cost runs.
DEADLINE=${DEADLINE:-300}  # each evaluation job (they run side by side)
COST_DEADLINE=${COST_DEADLINE:-90}  # each of the two cost runs
RES=$OUT/res
mkdir -p "$RES"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
if ! command -v uncomp >/dev/null; then  # a checkout on PYTHONPATH, not installed: a stand-in that `timeout` can run
    BIN=$(mktemp -d)
    printf '#!/usr/bin/env python3\nimport sys\nfrom uncomp_cli.cli.app import main\nsys.argv[0] = "uncomp"\nmain()\n' \
        >"$BIN/uncomp"
    chmod +x "$BIN/uncomp"
    export PATH=$BIN:$PATH
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
    | tee -a "$RES/gpu.txt"

# The main job on CUDA (also converts the GGUF once, before the parallel jobs read the conversion).
uncomp generate "Name three uses of a compressed KV cache." --device cuda --max-new-tokens 24 \
    >"$RES/generate.txt" 2>"$RES/generate.log"
echo "generate rc=$?" | tee -a "$RES/gpu.txt"

GRID=(--haystack "$HAYSTACK" --lengths 2k,4k --samples 4 --seed 11 --query-agnostic --device cuda --dtype float32
      --budgets 10%,5%,2% --json)
W=(--needle-template "The access PIN for the {key} office is {value}."
   --question-template "What is the access PIN for the {key} office?"
   --answer-prefix "The access PIN for the {key} office is")
MQ=(--haystack "$HAYSTACK" --lengths 2k,4k --depths 0.1,0.3,0.5,0.7,0.9 --seed 0 "${W[@]}" --questions 4
    --query-agnostic --device cuda --dtype float32 --budgets 10% --json)
DEV=(--haystack "$HAYSTACK" --lengths 2k,4k --seed 12 --methods uncomp,snapkv --budgets 10%,5%
     --variants global,share50,share0,floor25 --device cuda --verbose --json)
job() {  # name, command...: one background job with its own log, cut at the deadline
    local name=$1; shift
    (timeout "$DEADLINE" "$@" >"$RES/$name.out" 2>"$RES/$name.log"; echo "$name rc=$?" >>"$RES/rc.txt") &
}
for method in full snapkv uncomp pyramidkv adakv h2o streamingllm; do
    job "grid-reconstruct-$method" uncomp eval needle "${GRID[@]}" --methods "$method" --context-scorer reconstruct \
        --out "$RES/grid-reconstruct-$method"
done
for method in snapkv uncomp; do
    job "grid-gate-$method" uncomp eval needle "${GRID[@]}" --methods "$method" --context-scorer gate \
        --out "$RES/grid-gate-$method"
done
job mq-reconstruct uncomp eval needle "${MQ[@]}" --methods full,uncomp,snapkv --context-scorer reconstruct \
    --out "$RES/mq-reconstruct"
job mq-gate uncomp eval needle "${MQ[@]}" --methods uncomp,snapkv --context-scorer gate --out "$RES/mq-gate"
for set in builtin-seed12 password serial; do
    job "dev-$set" python3 scripts/context_selection_dev.py "${DEV[@]}" --wordings "$set" --tasks ""
done
for task in vt niah_multiquery; do
    job "dev-$task" python3 scripts/context_selection_dev.py "${DEV[@]}" --wordings "" --tasks "$task"
done
job dev-gate python3 scripts/context_selection_dev.py "${DEV[@]}" --wordings builtin-seed12,password,serial \
    --tasks vt,niah_multiquery --variants global --scorer gate
wait
# Cost of making a context against a full prefill on CUDA, after the evaluations (alone on the GPU):
# in the model's dtype there (bfloat16), with each scorer.
for run in "bfloat16 gate" "bfloat16 reconstruct"; do
    set -- $run
    timeout "$COST_DEADLINE" python3 scripts/bench_context_cost.py --haystack "$HAYSTACK" --lengths 4k,8k \
        --methods snapkv,uncomp --budget 10% --repeats 3 --device cuda --dtype "$1" \
        --context-scorer "$2" >>"$RES/cost.jsonl" 2>>"$RES/cost.log"
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader >>"$RES/gpu.txt"
