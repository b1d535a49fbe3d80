"""Defaults that the CLI shows in --help without importing torch; the library reads them from here.

Selection defaults were chosen by measurement on the needle test (docs/results.md): on the small
embedded model a window of 8 / kernel 7 loses the digits of a number that 32 / 21 keeps, and at a
5 % budget average pooling keeps whole numbers that max pooling cuts at their last digits.
"""

DEFAULT_METHOD = "full"
DEFAULT_BUDGET = "10%"
DEFAULT_WINDOW = 32
DEFAULT_KERNEL = 21
DEFAULT_POOLING = "avg"
DEFAULT_AGGREGATE = "mean"

#: Hidden-state pruning starts no earlier than this share of the layers: early layers attend by
#: position, and pruning from layer 1 on their scores lost the needle at 2 of 5 depths on the
#: embedded model where starting at layer 8 (of 30) kept it (docs/results.md).
FIRST_PRUNED_LAYER_FRACTION = 0.25

#: The official code's absolute pruning schedule (``--prefill-schedule official``): a layer in stage s
#: of S runs on ``min(N, m + a·(S − s))`` tokens, with m = 1536 and a = 640 at its maximum length of
#: 4096 (Llama-2: 4096 / 3456 / 2816 / 2176 / 1536 over five stages); m and a scale with
#: ``--prefill-max-len``.
DEFAULT_PREFILL_MAX_LEN = 4096
OFFICIAL_PRUNE_MIN_SHARE = 1536 / 4096
OFFICIAL_PRUNE_STEP_SHARE = 640 / 4096

#: ``--preset official``: the official UNComp code's configuration in one flag, so a result
#: labelled "official UNComp" is reproducible (the defaults stay what measurements chose).
PRESETS = {
    "official": {"window": 8, "kernel": 7, "pooling": "max", "decode_evict": True,
                 "prefill_schedule": "official", "prefill_from": 2},
}

#: Calibration: head groups per layer (capped at the number of KV heads) and the entropy drop
#: (on the H_k / ln d scale) that starts a new prefill stage; see docs/calibration.md.
DEFAULT_GROUPS = 2
DEFAULT_STAGE_THRESHOLD = 0.02

#: How a context compressed before its questions is scored: by how the model re-reads it (KVzip-style,
#: ranked across layers and heads). On the needle development set (seed 12, 2k) it found 6/6 needles
#: for uncomp at 10 % where the method's own window at the end of the context found 0/6
#: (docs/methods.md, compressed contexts).
DEFAULT_CONTEXT_SCORER = "reconstruct"

#: StreamingLLM's attention sinks: the first real tokens every KV head keeps (the paper's 4).
DEFAULT_SINKS = 4
#: PyramidKV: beyond the window, the top layer keeps 1/beta of the average and the bottom layer
#: twice the average minus that (the official code's beta, 20).
DEFAULT_PYRAMID_BETA = 20
#: AdaKV's safeguard: every KV head keeps at least this share of the average budget beyond the
#: window, whatever the layer-wide top-k says (the paper's and kvpress's alpha, 0.2).
DEFAULT_ADAKV_FLOOR = 0.2
