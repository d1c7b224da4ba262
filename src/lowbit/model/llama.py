"""The LLaMA-family decoder as a plain nn.Module: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Covers LLaMA 1/2/3, Vicuna, Llama-2-70B-style GQA, SmolLM2 (tied embeddings) and optional biases. The
linear layers are injected through `make_linear`, so the same module runs float and GPTQ weights; the
KV cache is injected per call (any object with `attend(layer, rows, input_pos, q, k, v, fresh, rope)`), so the
engine owns memory, scheduling and the attention kernel. The small ops (RMSNorm, RoPE, SiLU*up) go through
`lowbit.kernels.ops`: fused Triton kernels on CUDA, their torch references elsewhere. Checkpoint names and
fusing live in `lowbit.model.weights`.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from lowbit.config import ModelConfig, RopeConfig
from lowbit.kernels import ops
from lowbit.kernels.partials import AttentionPartials
from lowbit.kernels.reference import sdpa_reference

LinearFactory = Callable[[str, int, int, bool], nn.Module]


def dense_linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """The default factory: a float linear (an nn.Linear; the name is for factories that need it)."""
    from lowbit.model.linear import FloatLinear

    return FloatLinear(in_features, out_features, bias=bias)


def input_order(linear: nn.Module, x: Tensor):
    """The order in which `linear` reads input like x (its channels last), for one that says
    (`QuantLinear.input_order`: act-order rows sorted by group); None: in order. The norm, attention or SwiGLU
    before it then writes x in that order."""
    ask = getattr(linear, "input_order", None)
    return None if ask is None else ask(x[..., 0].numel())


def _linear(linear: nn.Module, x: Tensor, sorted_input: bool, add_to: Tensor | None = None) -> Tensor:
    """linear(x), or added into add_to (a linear whose `adds_in_place` said so)."""
    if add_to is not None:
        return linear(x, sorted_input=sorted_input, add_to=add_to)
    return linear(x, sorted_input=True) if sorted_input else linear(x)


def adds_in_place(linear: nn.Module, rows: int) -> bool:
    """Whether `linear` adds its output into a float32 residual stream for free (`QuantLinear.adds_in_place`)."""
    ask = getattr(linear, "adds_in_place", None)
    return ask is not None and ask(rows)


class Cache(Protocol):
    max_seq_len: int

    def attend(self, layer: int, rows: Tensor | None, input_pos: Tensor, q: Tensor, k: Tensor, v: Tensor,
               fresh: bool, rope: tuple[Tensor, Tensor], order=None, merged: bool = True) -> Tensor:
        """Rotate q [B, T, H, D] and k [B, T, n_kv, D] by rope = (cos, sin) [B, T, D] (the cache may fuse it
        into its kernel), store k/v at input_pos [B, T] of slots `rows`; return attention [B, T, H * D] of q
        over the cached positions up to each token's own (fresh: the rows are new sequences at positions
        0..T-1, attending causally among themselves), its channels
        (head c // D, dim c % D for channel c) in `order` (a `qmatmul.ChannelOrder`) when given. merged=False
        (asked only by a wo that `merges_attention`): the cache may return its decode kernel's unmerged
        `AttentionPartials` instead, for wo to merge."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, order=None, dtype: torch.dtype | None = None) -> Tensor:
        """norm(x); order: its channels in the order the next linear reads them (`input_order`); dtype: its
        dtype (a float32 residual stream normalized for the linears' dtype)."""
        return ops.rms_norm(x, self.weight, self.eps, order, dtype)

    def add_forward(self, x: Tensor, residual: Tensor, order=None) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps, order)


def rope_inv_freq(rope: RopeConfig, head_dim: int, seq_len: int, max_positions: int) -> Tensor:
    """Inverse frequencies [head_dim/2] for every rope kind; `seq_len` matters only for 'dynamic' (NTK)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    theta = rope.theta
    if rope.kind == "dynamic" and seq_len > max_positions:
        theta = theta * ((rope.factor * seq_len / max_positions) - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta**exponents
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    if rope.kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: Tensor, rope: RopeConfig) -> Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by factor, a smooth ramp in between."""
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos/sin tables for the positions of a forward call (half-split layout, as HF checkpoints expect)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq = rope_inv_freq(config.rope, config.head_dim, 0, config.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[tuple, Tensor] = {}

    def forward(self, input_pos: Tensor, dtype: torch.dtype, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin [B, T, D] for input_pos [B, T]. limit (a cache's length; every position is below it): they
        come from a table of `limit` positions kept between calls, one gather instead of the ~7 launches that
        compute them (a decode step's worth of plain launches, which PDL cannot overlap)."""
        inv_freq = self.inv_freq
        if self.config.rope.kind == "dynamic":  # NTK: frequencies depend on the longest position (host sync)
            seq_len = int(input_pos.max()) + 1
            c = self.config
            inv_freq = rope_inv_freq(c.rope, c.head_dim, seq_len, c.max_position_embeddings).to(inv_freq.device)
        elif limit is not None:
            return self._table(limit, dtype)[input_pos].unbind(-2)
        return self._cos_sin(input_pos.float(), inv_freq, dtype)

    @staticmethod
    def _cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None] * inv_freq  # [..., D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _table(self, limit: int, dtype: torch.dtype) -> Tensor:
        """[limit, 2, D]: cos and sin of positions 0..limit-1, computed as `forward` computes them (so the same
        values). Kept per length: a captured CUDA graph may read a table after a longer one is built."""
        key = (limit, dtype, self.inv_freq.device)
        if key not in self._tables:
            positions = torch.arange(limit, device=self.inv_freq.device, dtype=torch.float32)
            self._tables[key] = torch.stack(self._cos_sin(positions, self.inv_freq, dtype), dim=1)
        return self._tables[key]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, make_linear: LinearFactory):
        super().__init__()
        c = config
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, c.num_heads, c.num_kv_heads, c.head_dim
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.split = (c.num_heads, c.num_kv_heads, c.num_kv_heads)  # heads of q, k, v in wqkv's output
        prefix = f"layers.{layer}.attention"
        self.wqkv = make_linear(f"{prefix}.wqkv", c.hidden_size, q_dim + 2 * kv_dim, c.attention_bias)
        self.wo = make_linear(f"{prefix}.wo", q_dim, c.hidden_size, c.attention_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], fresh: bool, cache: Cache | None,
                rows: Tensor | None, input_pos: Tensor, sorted_input: bool = False) -> Tensor:
        """sorted_input: x's channels come in wqkv's `input_order`."""
        B, T, _ = x.shape
        qkv = _linear(self.wqkv, x, sorted_input)
        if cache is not None:
            return self.attend(qkv, rope, fresh, cache, rows, input_pos)
        qkv = qkv.view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        qkv = ops.rope(qkv, *rope, self.n_heads + self.n_kv)  # q and k heads
        q, k, v = qkv.split(self.split, dim=2)  # GQA: sdpa_reference repeats each kv head for its group
        y = sdpa_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None).transpose(1, 2)
        return self.wo(y.reshape(B, T, -1))

    def attend(self, qkv: Tensor, rope: tuple[Tensor, Tensor], fresh: bool, cache: Cache, rows: Tensor | None,
               input_pos: Tensor, add_to: Tensor | None = None) -> Tensor:
        """wo(attention) for wqkv's output qkv [B, T, (H + 2 KV) * D] through the cache (which applies RoPE, its
        decode kernel on the fly; float32 sums are rounded to its dtype); add_to: wo adds its output into it."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim).split(self.split, dim=2)
        order = input_order(self.wo, qkv)  # act-order wo: the attention kernel writes in the order wo reads
        merges = getattr(self.wo, "merges_attention", None)  # wo merges decode attention's splits as it loads
        unmerged = add_to is not None and T == 1 and merges is not None and merges(B)
        y = cache.attend(self.layer, rows, input_pos, q, k, v, fresh, rope, order,
                         **({"merged": False} if unmerged else {}))  # (only such a wo asks: other caches may not know)
        if isinstance(y, AttentionPartials):
            return self.wo.add_attention(y, add_to)
        return _linear(self.wo, y, order is not None, add_to)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, make_linear: LinearFactory):
        super().__init__()
        c, prefix = config, f"layers.{layer}.mlp"
        self.w13 = make_linear(f"{prefix}.w13", c.hidden_size, 2 * c.intermediate_size, c.mlp_bias)
        self.w2 = make_linear(f"{prefix}.w2", c.intermediate_size, c.hidden_size, c.mlp_bias)

    def forward(self, x: Tensor, sorted_input: bool = False) -> Tensor:
        """sorted_input: x's channels come in w13's `input_order`."""
        fused = getattr(self.w13, "forward_swiglu", None)  # a linear that applies SwiGLU itself (QuantLinear)
        if fused is None:  # w13 holds gate then up
            return self.w2(ops.silu_mul(_linear(self.w13, x, sorted_input)))
        order = input_order(self.w2, x)  # act-order w2: SwiGLU writes the activations in the order w2 reads
        return _linear(self.w2, fused(x, sorted_input=sorted_input, order=order), order is not None)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, make_linear: LinearFactory):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer, make_linear)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer, make_linear)

    def forward(self, x: Tensor, rope, fresh, cache, rows, input_pos) -> Tensor:
        """The block's output hidden state (calibration runs the model block by block through this)."""
        m, h = self.forward_split(x, None, rope, fresh, cache, rows, input_pos)
        return h + m

    def forward_split(self, x: Tensor, residual: Tensor | None, rope, fresh, cache, rows,
                      input_pos) -> tuple[Tensor, Tensor]:
        """The block on hidden state x + residual (residual None: just x), returned as the pair (MLP output,
        residual stream) whose sum is the output: the model adds them inside the next block's norm (one launch
        for the add and the norm)."""
        order = input_order(self.attention.wqkv, x)  # act-order: each norm writes x in the order its linear reads
        if residual is None:
            n, h = self.attention_norm(x, order), x
        else:
            n, h = self.attention_norm.add_forward(x, residual, order)
        a = self.attention(n, rope, fresh, cache, rows, input_pos, sorted_input=order is not None)
        order = input_order(self.mlp.w13, x)
        n, h = self.ffn_norm.add_forward(a, h, order)  # h = h + a
        return self.mlp(n, sorted_input=order is not None), h

    def adds_in_place(self, rows: int) -> bool:
        """Whether this block runs `forward_into` for `rows` rows: each of its linears adds for free."""
        linears = (self.attention.wqkv, self.attention.wo, self.mlp.w13, self.mlp.w2)
        return all(adds_in_place(linear, rows) for linear in linears)

    def forward_into(self, h: Tensor, dtype: torch.dtype, sums: tuple[Tensor, Tensor], rope, fresh, cache, rows,
                     input_pos) -> Tensor:
        """The block on a float32 residual stream h, updated in place and returned (a cache is required).

        Every linear adds its float32 sums into a buffer (`adds_in_place`: the GEMV's K splits add there
        directly, with no split-K finish): o_proj and down_proj into h, which is the residual add; q/k/v and
        gate/up into `sums`, zeroed buffers of their widths. The norms read h and write `dtype` (in an act-order
        linear's order). The attention kernel rounds the q/k/v sums to the cache's
        dtype, and down_proj computes SwiGLU of the gate/up sums as it loads them (`qmatmul`'s swiglu_input),
        which gate/up adds in the order an act-order down_proj reads."""
        attn, mlp = self.attention, self.mlp
        qkv, gate_up = sums
        order = input_order(attn.wqkv, h)
        attn.wqkv(self.attention_norm(h, order, dtype), sorted_input=order is not None, add_to=qkv)
        attn.attend(qkv, rope, fresh, cache, rows, input_pos, add_to=h)
        w2_order = input_order(mlp.w2, h)  # act-order w2: w13 adds gate/up in the order w2 reads them
        order = input_order(mlp.w13, h)
        mlp.w13(self.ffn_norm(h, order, dtype), sorted_input=order is not None, add_to=gate_up, order=w2_order)
        mlp.w2(gate_up, sorted_input=w2_order is not None, add_to=h, swiglu_input=dtype)
        return h


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, make_linear: LinearFactory = dense_linear):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, make_linear) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, cache: Cache | None = None,
                rows: Tensor | None = None, last_only: bool | Tensor = False) -> Tensor:
        """tokens, input_pos [B, T] -> logits [B, T or 1, vocab].

        Without a cache, tokens attend causally among themselves (perplexity, calibration). With a cache,
        row b writes its keys at input_pos[b] of cache slot rows[b] (all slots when rows is None) and
        attends to every cached position <= its own; rows may sit at different lengths. With a cache and
        no input_pos the rows are whole new sequences (positions 0..T-1): they attend causally among
        themselves only, which lets the cache use flash attention for the prefill. last_only: logits of the
        last position only; an int64 tensor [B]: of position last_only[b] of row b only (a prompt padded past
        its end, whose padding the causal mask keeps out of its own positions).
        """
        B, T = tokens.shape
        fresh = input_pos is None
        if fresh:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.tok_embeddings(tokens)
        rope = self.rotary(input_pos, x.dtype, None if cache is None or fresh else cache.max_seq_len)
        if cache is not None and all(layer.adds_in_place(B * T) for layer in self.layers):
            return self._forward_float32_residual(x, rope, fresh, cache, rows, input_pos, last_only)
        residual = None
        for layer in self.layers:
            x, residual = layer.forward_split(x, residual, rope, fresh, cache, rows, input_pos)
        if isinstance(last_only, Tensor) or last_only:
            x, residual = _position(x, last_only), None if residual is None else _position(residual, last_only)
        x = self.norm(x) if residual is None else self.norm.add_forward(x, residual)[0]
        return self.output(x)

    def _forward_float32_residual(self, x: Tensor, rope, fresh, cache, rows, input_pos,
                                  last_only: bool | Tensor) -> Tensor:
        """forward with the residual stream in float32, each block's linears adding into it (`Block.forward_into`):
        one-row decode on the "triton" GEMV, where that saves every launch's split-K finish, a few rows on the mma
        layout's kernel, or one row on the float GEMV (`FloatLinear`); one memset zeroes every layer's q/k/v and
        gate/up sums."""
        h = x.float()
        lead, n = h.shape[:-1], h[..., 0].numel()
        widths = [self.layers[0].attention.wqkv.out_features, self.layers[0].mlp.w13.out_features]
        sums = h.new_zeros(len(self.layers), n * sum(widths))  # each layer's buffers contiguous, as adding needs
        for layer, flat in zip(self.layers, sums):
            layer_sums = tuple(part.view(*lead, w) for part, w in zip(flat.split([n * w for w in widths]), widths))
            h = layer.forward_into(h, x.dtype, layer_sums, rope, fresh, cache, rows, input_pos)
        if isinstance(last_only, Tensor) or last_only:
            h = _position(h, last_only)
        return self.output(self.norm(h, dtype=x.dtype))


def _position(t: Tensor, last_only: bool | Tensor) -> Tensor:
    """t [B, T, D] -> [B, 1, D]: the last position (last_only True) or position last_only[b] of each row b."""
    if isinstance(last_only, Tensor):
        return t.gather(1, last_only.view(-1, 1, 1).expand(-1, 1, t.shape[-1]))
    return t[:, -1:]
