"""Tiny random models and a tiny tokenizer built from configs (no downloads), for every test.

Import with ``from tiny import ...`` (pyproject puts tests/ on the path); conftest.py holds fixtures.
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
HAYSTACK_DIR = REPO_ROOT.parent / "shared" / "data" / "haystack"

# name -> (model_type, num_attention_heads, num_key_value_heads)
TINY_SHAPES = {
    "llama-gqa": ("llama", 4, 2),
    "llama-mha": ("llama", 4, 4),
    "mistral-gqa": ("mistral", 4, 2),
    "qwen2-gqa": ("qwen2", 4, 2),
    "qwen3-gqa": ("qwen3", 4, 2),
    "gemma2-gqa": ("gemma2", 4, 2),
    "gemma3-gqa": ("gemma3_text", 4, 2),
    "phi3-gqa": ("phi3", 4, 2),
}

#: What makes each architecture itself at tiny size: sliding windows short enough that 30–40-token
#: prompts cross them (Gemma 2 and 3 alternate sliding and full layers, Phi-3 slides everywhere),
#: Gemma 2's attention soft-capping and Gemma's own query scaling; Qwen3 and Gemma 3 bring q/k norms.
ARCHITECTURE = {
    "mistral": {"sliding_window": None},
    "qwen2": {"sliding_window": None},
    "qwen3": {"sliding_window": None},
    "gemma2": {"sliding_window": 12, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 30.0,
               "query_pre_attn_scalar": 24, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "gemma3_text": {"sliding_window": 12, "query_pre_attn_scalar": 24,
                    "layer_types": ["sliding_attention", "full_attention"] * 2},
    "phi3": {"sliding_window": 16},
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_config(model_type: str = "llama", heads: int = 4, kv_heads: int = 2, layers: int = 4,
                vocab_size: int = 300, head_dim: int = 16):
    """A config small enough that a forward pass takes milliseconds on a CPU."""
    from transformers import AutoConfig

    extra = dict(ARCHITECTURE.get(model_type, {}))
    if "layer_types" in extra:
        extra["layer_types"] = (extra["layer_types"] * layers)[:layers]
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **extra,
    )


def tiny_model(name: str = "llama-gqa", seed: int = 0, **overrides):
    """A seeded random causal LM in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    model_type, heads, kv_heads = TINY_SHAPES[name]
    torch.manual_seed(seed)
    config = tiny_config(model_type, heads, kv_heads, **overrides)
    config._attn_implementation = "eager" if model_type == "gemma2" else "sdpa"  # Gemma 2: soft-capping
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["The capital of France is Paris.", "hello world, the quick brown fox"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
