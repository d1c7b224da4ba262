"""Frozen configuration dataclasses: the single source of truth for model shape and quantization.

`ModelConfig` is read from a Hugging Face `config.json` (old `rope_scaling` and new `rope_parameters`
spellings alike); `QuantConfig` from `quantize_config.json`, `quant_config.json` or `config.json`'s
`quantization_config`. Reading the files is left to `lowbit.model.weights`; this module parses dicts.
`ServerConfig` holds the HTTP server's settings (`lowbit serve` derives its flags from it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lowbit.errors import LowbitError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `kind` is one of ROPE_TYPES."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> RopeConfig:
        params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise LowbitError(f"unsupported rope type {kind!r}; lowbit supports {', '.join(ROPE_TYPES)}")
        return cls(
            theta=theta,
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-family decoder (LLaMA 1/2/3, Vicuna, Mistral-style GQA, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise LowbitError(f"unsupported architecture {arch!r}; lowbit runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise LowbitError(f"unsupported hidden_act {d['hidden_act']!r}; LLaMA-family models use silu")
        try:
            num_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden // num_heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(d),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                architecture=arch,
            )
        except KeyError as e:
            raise LowbitError(f"config.json lacks required field {e.args[0]!r}") from None

    @property
    def num_params(self) -> int:
        """Parameter count, embeddings included (tied embeddings counted once)."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


QUANT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class QuantConfig:
    """GPTQ settings, as every GPTQ tool writes them in quantize_config.json.

    act_group_aware (GAR, GPTQModel's option and default): GPTQ visits the columns group by group, the
    groups by their largest Hessian diagonal and each group's columns by theirs, so the file stays plain
    (g_idx = i // group_size). It changes how codes are found, not the format. None = on unless desc_act,
    as in GPTQModel; `gar` is the resolved value. True together with desc_act is refused; a value equal to
    the default is stored as None, so that equal settings compare (and fingerprint) equal.
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    checkpoint_format: str = "gptq"
    act_group_aware: bool | None = None

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise LowbitError(f"unsupported GPTQ bits={self.bits}; lowbit handles 2, 3, 4, 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise LowbitError(f"group_size must be -1 or positive, got {self.group_size}")
        if self.checkpoint_format not in QUANT_FORMATS:
            raise LowbitError(
                f"unsupported checkpoint_format {self.checkpoint_format!r}; expected one of {', '.join(QUANT_FORMATS)}"
            )
        if self.act_group_aware and self.desc_act:
            raise LowbitError("act_group_aware (GAR) needs desc_act off: act-order already orders every column; "
                              "choose one of them")
        if self.act_group_aware is not None and self.act_group_aware == (not self.desc_act):
            object.__setattr__(self, "act_group_aware", None)

    @property
    def gar(self) -> bool:
        """Whether GPTQ uses group-aware reordering: act_group_aware, or (unset) whenever desc_act is off."""
        return (not self.desc_act) if self.act_group_aware is None else self.act_group_aware

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        method = str(d.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise LowbitError(f"unsupported quant_method {method!r}; lowbit reads GPTQ checkpoints")
        fmt = d.get("checkpoint_format") or d.get("format") or "gptq"
        known = {f.name for f in dataclasses.fields(cls)} - {"checkpoint_format", "act_group_aware"}
        kwargs = {k: d[k] for k in known if d.get(k) is not None}
        gar = (d.get("meta") or {}).get("act_group_aware", d.get("act_group_aware"))
        if gar is not None and not kwargs.get("desc_act"):  # how codes were found: never a reason to refuse a file
            kwargs["act_group_aware"] = bool(gar)
        try:
            return cls(**{**kwargs, "bits": int(d.get("bits", 4)), "checkpoint_format": str(fmt).lower()})
        except (TypeError, ValueError) as e:
            raise LowbitError(f"bad quantization config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The quantize_config.json keys; act_group_aware goes under "meta", where GPTQModel writes it, out of
        the way of loaders that know only the classic keys."""
        d = dataclasses.asdict(self)
        del d["act_group_aware"]
        d["quant_method"] = "gptq"
        d["meta"] = {"act_group_aware": self.gar}
        return d


# lowbit's recommended 4-bit recipe, from the quality study (benchmarks/results/quantize.md): act-order with
# static groups (g_idx in the file stays monotonic, so every kernel runs it at full speed), asymmetric zero
# points (GPTQ keeps them in [1, 2^bits - 1], which v1 "gptq" files store) and the MSE clipping search for
# each group's scale (mse=True in `quantize`). QuantConfig's own defaults stay the GPTQ tools' defaults: they
# are also what a quantize_config.json that omits a key means.
RECOMMENDED_QUANT = QuantConfig(desc_act=True, static_groups=True, sym=False)
RECOMMENDED_MSE = True


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text GPTQ sees: `dataset` is wikitext2, c4, or a local .txt/.jsonl/.parquet file or folder."""

    dataset: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples <= 0 or self.seqlen <= 1:
            raise LowbitError(f"nsamples and seqlen must be positive, got {self.nsamples} and {self.seqlen}")


@dataclass(frozen=True)
class ServerConfig:
    """What `lowbit.server.app` needs besides the engine (whose sizing is `EngineConfig`); no fastapi here,
    so that the CLI can build its flags without the serve extra installed."""

    model_name: str = field(default="lowbit", metadata={"help": "the model id clients send (default: MODEL's name)"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1/* and /info (default: $LOWBIT_API_KEY, else none)"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body accepted (default 1 MiB)"})
