"""8-bit storage for a head group's keys and values: more kept tokens in the same bytes.

A compressed context that several questions share loses answers to its budget more than to what
it keeps (docs/results.md, "Multi-query"): 20 % of the tokens keep what 10 % loses. Rounded to
8 bits (a byte a number, and a float16 minimum and step per token and 32 channels: 72 bytes for a
64-channel vector against 128 in bfloat16, 256 in float32), 20 % of the tokens hold about 11.3 % of
a bfloat16 full cache's bytes (5.6 % of a float32 one; a little more with the sinks and the
window). A simulation on the multi-query development set (``scripts/kv_quant_sim.py``: keys
rounded per channel as KIVI does, values per token) answered at 8 bits as the unrounded 20 % did
(52 of the full cache's 59 answers kept, both) and at 4 bits lost 9 of them, so only 8 is offered;
held-out numbers for this scheme: docs/results.md.

The scheme is KIVI's and KVQuant's asymmetric integer rounding, per token: each stored vector's
channels in groups of :data:`GROUP` (the whole vector when the head size is not a multiple) share
a minimum and a step, kept in float16. Per token (not per channel, as KIVI keeps keys at 2 bits)
because tokens are appended one at a time while decoding; at 8 bits the difference is below the
rounding. A :class:`QuantisedBuffer` stands where a group holds a ``[B, h, C, d]`` tensor:
:class:`~uncomp_cli.engine.groups.HeadGroup` writes into it and reads it back dequantised, in
the dtype it was given.
"""

from __future__ import annotations

import torch

from uncomp_cli.errors import UncompError

#: Channels sharing a minimum and a step.
GROUP = 32
#: What ``--kv-bits`` accepts (None: the model's dtype).
KV_BITS = (8,)
_LEVELS = 255


def group_size(dim: int) -> int:
    return GROUP if dim % GROUP == 0 else dim


class QuantisedBuffer:
    """``[B, h, C, d]`` values stored as uint8 codes with a float16 minimum and step per token and
    :data:`GROUP` channels; ``dtype``: what :meth:`read` returns."""

    def __init__(self, codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, dtype: torch.dtype):
        self.codes, self.low, self.step, self.dtype = codes, low, step, dtype

    @classmethod
    def of(cls, values: torch.Tensor) -> QuantisedBuffer:
        """``values`` [B, h, T, d] rounded to 8 bits."""
        return cls(*_quantise(values), values.dtype)

    def grown(self, capacity: int, length: int) -> QuantisedBuffer:
        """A new buffer of ``capacity`` tokens holding this one's first ``length`` (this one unchanged)."""
        def resized(tensor: torch.Tensor) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[2] = capacity
            bigger = tensor.new_empty(shape)
            bigger[:, :, :length] = tensor[:, :, :length]
            return bigger
        return QuantisedBuffer(resized(self.codes), resized(self.low), resized(self.step), self.dtype)

    def map(self, fn) -> QuantisedBuffer:
        """``fn`` applied to the codes, minima and steps (a function over the batch dimension)."""
        return QuantisedBuffer(fn(self.codes), fn(self.low), fn(self.step), self.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def read(self, length: int) -> torch.Tensor:
        """The first ``length`` tokens, dequantised: [B, h, length, d] in :attr:`dtype`."""
        codes = self.codes[:, :, :length]
        batch, heads, tokens, dim = codes.shape
        size = group_size(dim)
        grouped = codes.reshape(batch, heads, tokens, dim // size, size)
        values = torch.addcmul(self.low[:, :, :length, :, None].float(), grouped,  # one pass: low + code × step
                               self.step[:, :, :length, :, None].float())
        return values.reshape(batch, heads, tokens, dim).to(self.dtype)

    def write(self, start: int, values: torch.Tensor) -> None:
        """Store ``values`` [B, h, n, d] at tokens ``start`` … ``start + n`` (within the capacity)."""
        codes, low, step = _quantise(values)
        end = start + values.shape[2]
        self.codes[:, :, start:end], self.low[:, :, start:end], self.step[:, :, start:end] = codes, low, step

    def cut(self, length: int) -> QuantisedBuffer:
        """The first ``length`` tokens, as views (a snapshot without slack)."""
        return QuantisedBuffer(self.codes[:, :, :length], self.low[:, :, :length], self.step[:, :, :length],
                               self.dtype)

    def nbytes(self, length: int | None = None) -> int:
        """Bytes of the first ``length`` tokens (all: the buffer)."""
        tokens = self.codes.shape[2] if length is None else length
        per_token = self.codes.shape[3] * self.codes.element_size() + \
            self.low.shape[3] * (self.low.element_size() + self.step.element_size())
        return self.codes.shape[0] * self.codes.shape[1] * tokens * per_token

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a file holds of it, by name."""
        return {"codes": self.codes, "low": self.low, "step": self.step}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> QuantisedBuffer:
        codes, low, step = tensors["codes"], tensors["low"], tensors["step"]
        if codes.dtype != torch.uint8 or codes.dim() != 4 or low.shape != step.shape \
                or low.shape != (*codes.shape[:3], codes.shape[3] // group_size(codes.shape[3])):
            raise ValueError("8-bit keys or values whose codes, minima and steps do not fit together")
        return cls(codes, low.to(torch.float16), step.to(torch.float16), dtype)


def _quantise(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [B, h, T, d], minimum and step float16 [B, h, T, d / group]) of ``values``."""
    batch, heads, tokens, dim = values.shape
    size = group_size(dim)
    grouped = values.float().reshape(batch, heads, tokens, dim // size, size)
    low = grouped.amin(-1).to(torch.float16)
    high = grouped.amax(-1)
    step = ((high - low.float()) / _LEVELS).clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16)
    codes = ((grouped - low.float()[..., None]) / step.float()[..., None]).round().clamp(0, _LEVELS).to(torch.uint8)
    return codes.reshape(batch, heads, tokens, dim), low, step


def check_kv_bits(bits: int | None) -> int | None:
    if bits is not None and bits not in KV_BITS:
        raise UncompError(f"--kv-bits must be {' or '.join(map(str, KV_BITS))} (or left out), got {bits}")
    return bits
