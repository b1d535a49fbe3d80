"""A learned gate that predicts a context's re-reading scores from its prefill (KVzap's idea).

The re-reading (:mod:`uncomp_cli.contexts.reread`) scores every KV entry by how much attention the
model pays it while repeating the context, and costs ~4.5 prefills on a CPU (far more on a GPU).
The gate predicts those scores from what the prefill computes anyway: for each layer, a linear
map from the normalised hidden state entering its attention (what its keys and values are made
from) to the log of the re-reading's score for each KV head —
``log s[h, t] ≈ x_t · W[l, :, h] + b[l, h]``. Applying it is one ``[N, D] × [D, H_kv]`` product
per layer during the prefill, so a context costs about one prefill.

Training needs no labels and no task: it re-reads windows of calibration text (the same built-in
Python docstrings calibration uses, or any text) and fits the map by ridge regression, one layer at
a time, from accumulated normal equations (no hidden states are kept). A gate is made once per
model and cached (:func:`gate_for`), like the calibration profile; ``docs/context-format.md``
describes its file. Nothing in training sees a needle, a question or an evaluation wording.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from uncomp_cli.engine.attention import decoder_layers
from uncomp_cli.errors import UncompError
from uncomp_cli.files import atomic_write
from uncomp_cli.profile.file import model_fingerprint

log = logging.getLogger(__name__)

GATE_FORMAT = "uncomp-gate"
FORMAT_VERSION = 1
#: Built-in training: windows × tokens of calibration text, each re-read once (~4 min for the
#: embedded model on two CPU cores).
GATE_SAMPLES = 12
GATE_SEQ_LEN = 2048
#: Ridge strength, as a share of the mean diagonal of the features' Gram matrix (XᵀX).
RIDGE = 1e-2
#: Scores below this are recorded as this before the log (a re-reading's probabilities reach 1e-30).
FLOOR = 1e-8


class GateError(UncompError):
    """A gate file that cannot be used: unreadable, damaged, or made for another model."""


@dataclass
class ScoreGate:
    """Per layer, hidden state → log re-reading score per KV head: ``weights`` [L, D + 1, H_kv]
    float32, the last row the bias."""

    weights: torch.Tensor
    model: str
    model_fingerprint: str
    samples: int
    seq_len: int
    training_data: str

    @property
    def num_layers(self) -> int:
        return self.weights.shape[0]

    def check_model(self, config, name: str | None = None) -> None:
        if model_fingerprint(config) != self.model_fingerprint:
            raise GateError(f"the score gate was trained on {self.model}, not this model"
                            f"{f' ({name})' if name else ''}; delete it or train one for this model")

    def predict(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted scores [H_kv, n] for ``hidden`` [n, D] entering ``layer``'s attention."""
        weights = self.weights[layer].to(hidden.device)
        return torch.exp(hidden.float() @ weights[:-1] + weights[-1]).T


# ------------------------------------------------------------------------------ capture and apply


@contextlib.contextmanager
def attention_inputs(model: torch.nn.Module, on_input: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Inside the block, call ``on_input(layer, hidden [n, D])`` with the (normalised) hidden states
    each layer's attention receives, batch row 0; a layer pruning its hidden states passes the
    tokens it keeps."""
    def hook(index: int):
        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            on_input(index, hidden[0])
        return capture

    handles = [layer.self_attn.register_forward_pre_hook(hook(index), with_kwargs=True)
               for index, layer in enumerate(decoder_layers(model))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def predicting(gate: ScoreGate, model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Predict scores for everything fed inside the block; afterwards the list holds per layer
    [1, H_kv, N_l] float32, as a re-reading returns them."""
    if gate.num_layers != len(decoder_layers(model)):
        raise GateError(f"the score gate has {gate.num_layers} layers, the model {len(decoder_layers(model))}")
    device = next(model.parameters()).device
    gate = dataclasses.replace(gate, weights=gate.weights.to(device))  # once, not per layer and forward pass
    chunks: list[list[torch.Tensor]] = [[] for _ in range(gate.num_layers)]
    scores: list[torch.Tensor] = []
    with attention_inputs(model, lambda layer, hidden: chunks[layer].append(gate.predict(layer, hidden))):
        yield scores
    scores.extend(torch.cat(parts, dim=-1)[None] for parts in chunks)


# ------------------------------------------------------------------------------ training


def train_gate(loaded, text=None, samples: int = GATE_SAMPLES, seq_len: int = GATE_SEQ_LEN,
               progress: Callable[[int, int], None] | None = None) -> ScoreGate:
    """Fit a gate for ``loaded`` on ``samples`` windows of ``seq_len`` tokens of ``text`` (a
    :class:`~uncomp_cli.profile.calibration_text.CalibrationText`; default: the built-in source).

    Each window is prefilled as a context (chat template, every token kept), re-read, and its
    attention inputs and log scores added to each layer's normal equations.
    """
    from uncomp_cli.contexts.reread import reread
    from uncomp_cli.engine.steps import feed, prompt_positions
    from uncomp_cli.models.prompting import context_length, context_prompt, template_tail
    from uncomp_cli.policies.registry import make_policy
    from uncomp_cli.profile.calibration_text import builtin_texts, token_windows

    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise UncompError("training a score gate needs the model's tokenizer")
    seq_len = min(seq_len, context_length(model.config) // 2)
    text = text or builtin_texts(samples * seq_len, tokenizer)
    windows = token_windows(text, tokenizer, samples, seq_len).input_ids.tolist()
    tail = template_tail(tokenizer)
    policy = make_policy("snapkv")  # any policy that can defer its selection: the scores ignore it
    layers = len(decoder_layers(model))
    gram: list[torch.Tensor | None] = [None] * layers
    cross: list[torch.Tensor | None] = [None] * layers
    for done, window in enumerate(windows):
        ids, _ = context_prompt(tokenizer, tokenizer.decode(window))
        input_ids = torch.tensor([ids], device=loaded.device)
        mask = torch.ones_like(input_ids)
        features: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        with attention_inputs(model, lambda layer, hidden, into=features: into[layer].append(hidden.double().cpu())), \
                policy.attach(model, mask, policy.plan(model, mask).deferred()) as cache, torch.inference_mode():
            feed(model, cache, input_ids, mask, prompt_positions(mask))
        recorded = reread(loaded, cache, policy, ids, tail)
        for layer in range(layers):
            x = torch.cat(features[layer])
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            y = recorded[layer][0].T.double().cpu().clamp_min(FLOOR).log()
            gram[layer] = x.T @ x if gram[layer] is None else gram[layer] + x.T @ x
            cross[layer] = x.T @ y if cross[layer] is None else cross[layer] + x.T @ y
        if progress is not None:
            progress(done + 1, len(windows))
    weights = []
    for g, c in zip(gram, cross):
        ridge = RIDGE * float(g.diagonal().mean()) * torch.eye(g.shape[0], dtype=g.dtype)
        weights.append(torch.linalg.solve(g + ridge, c).float())
    return ScoreGate(torch.stack(weights), loaded.name, model_fingerprint(model.config), len(windows), seq_len,
                     text.description)


# ------------------------------------------------------------------------------ files


def save_gate(gate: ScoreGate, path: str | Path) -> Path:
    """Write ``gate`` atomically as safetensors (its settings in the string metadata)."""
    from safetensors.torch import save

    metadata = {"format": GATE_FORMAT, "format_version": str(FORMAT_VERSION), "model": gate.model,
                "model_fingerprint": gate.model_fingerprint, "samples": str(gate.samples),
                "seq_len": str(gate.seq_len), "training_data": gate.training_data}
    return atomic_write(path, save({"weights": gate.weights.contiguous()}, metadata=metadata))


def load_gate(path: str | Path) -> ScoreGate:
    """Read a gate file; anything but a complete gate of this format is a :class:`GateError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from uncomp_cli.contexts.file import file_metadata  # here: that module imports compress, which imports this

    path = Path(path)
    try:
        raw = path.read_bytes()
        tensors = load(raw)
        metadata = file_metadata(raw)
    except (OSError, SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise GateError(f"{path} is not a score gate file ({exc})") from None
    if metadata.get("format") != GATE_FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
        raise GateError(f"{path} is not a score gate file of format {GATE_FORMAT} v{FORMAT_VERSION}")
    weights = tensors.get("weights")
    if weights is None or weights.dim() != 3 or weights.dtype != torch.float32 or not torch.isfinite(weights).all():
        raise GateError(f"{path}: the gate's weights are missing or damaged")
    try:
        return ScoreGate(weights, metadata["model"], metadata["model_fingerprint"], int(metadata["samples"]),
                         int(metadata["seq_len"]), metadata.get("training_data", ""))
    except (KeyError, ValueError):
        raise GateError(f"{path}: the gate's metadata is incomplete") from None


def cached_gate_path(config) -> Path:
    from uncomp_cli.models.loading import cache_root

    return cache_root() / "gates" / f"{model_fingerprint(config)}.safetensors"


def gate_for(loaded) -> ScoreGate:
    """The gate cached for ``loaded``'s model, or one trained now on the built-in text and cached.
    A damaged cached file is replaced."""
    path = cached_gate_path(loaded.model.config)
    if path.is_file():
        try:
            gate = load_gate(path)
            gate.check_model(loaded.model.config, loaded.name)
            return gate
        except GateError as exc:
            log.warning("%s; training a new score gate", exc)
    log.info("no score gate for %s yet: training one on the built-in text (%d × %d tokens re-read), cached in %s",
             loaded.name, GATE_SAMPLES, GATE_SEQ_LEN, path)
    started = time.perf_counter()
    gate = train_gate(loaded, samples=GATE_SAMPLES, seq_len=GATE_SEQ_LEN,
                      progress=lambda done, total: log.info("score gate: window %d of %d", done, total))
    log.info("score gate trained in %.0f s", time.perf_counter() - started)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_gate(gate, path)
    except OSError as exc:  # a read-only cache costs a training next time, not this answer
        log.warning("cannot cache the score gate in %s: %s", path, exc.strerror or exc)
    return gate
