"""LLaDA: the bidirectional masked-diffusion language model, as a transformers PreTrainedModel.

    input_ids (B, L) | inputs_embeds (B, L, D) --N pre-norm blocks, no mask--> logits (B, L, V)

A LLaMA-shaped Transformer without a causal mask (digest §1.1): RMSNorm (fp32 math), half-split
RoPE, attention with optional grouped KV heads, SwiGLU, untied lm_head, no biases. Parameter names
are the LLaMA-style ones LLaDA-V uses; `load_llada_state_dict` renames the official LLaDA layout
(`model.transformer.blocks.N.*`, digest §1.3) and `LLaDAModelLM.from_checkpoint` loads either
layout from a folder or URI.

Owns: the architecture, its config, loading checkpoints, and the prefix key/value reuse the sampler
needs (Fast-dLLM's prefix cache, digest §5.4), passed in and out explicitly as `prefix_kv` and
`return_kv`, and packed rows (per-row RoPE positions, a per-sample attention block). Does not
own: masking and the loss (diffusion.py), the head's training form (head.py), sampling
(sampler.py), images (lladav.py), distribution (train/engine.py). The reference trains and
samples without an attention mask, so EOS pads are attended like any token (digest §2.5); the
optional masks serve own-tail batches and packing.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from lladav.model.head import LMHead
from transformers.utils import ModelOutput

log = logging.getLogger(__name__)

# LLaDA's special token ids (digest §1.2), the config's defaults below.
LLADA_BOS_TOKEN_ID = 126080  # <|startoftext|>
LLADA_EOS_TOKEN_ID = 126081  # <|endoftext|>, also the padding token (EOS padding, digest §2.5)
LLADA_MASK_TOKEN_ID = 126336  # <|mdm_mask|>, the [M] of the forward process (LLaDA paper §2.1)

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, n_kv_heads, L, head_dim), rotated


class LLaDAConfig(PretrainedConfig):
    """Architecture of a LLaDA language model; the defaults are LLaDA-8B-Instruct as LLaDA-V uses
    it (digest §1.1; max_position_embeddings is LLaDA-V's prepared config, original LLaDA: 4096).
    The flavour table (flavors.py) names configurations by how they differ from these."""

    model_type = "llada"

    vocab_size: int = 126464
    """Rows of the embedding and of lm_head (may exceed the tokenizer's size)."""
    hidden_size: int = 4096
    """Width of the residual stream (official config: d_model)."""
    intermediate_size: int = 12288
    """Width of the SwiGLU hidden layer (official config: mlp_hidden_size)."""
    num_hidden_layers: int = 32
    """Number of Transformer blocks (official config: n_layers)."""
    num_attention_heads: int = 32
    """Query heads; head_dim = hidden_size / num_attention_heads (official config: n_heads)."""
    num_key_value_heads: int | None = None
    """Key/value heads, shared by groups of query heads (GQA); None means num_attention_heads."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside every RMSNorm."""
    rope_theta: float = 500000.0
    """RoPE base; no scaling is applied at any length."""
    max_position_embeddings: int = 16384
    """Longest sequence the model is meant for; nothing is sized by it."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights (norm weights start at 1)."""
    mask_token_id: int = LLADA_MASK_TOKEN_ID
    """Id of the [M] token; the model never reads it, diffusion.py and sampler.py do."""
    bos_token_id: int | None = LLADA_BOS_TOKEN_ID
    """Beginning-of-text token id."""
    eos_token_id: int | None = LLADA_EOS_TOKEN_ID
    """End-of-text token id, also used to right-pad batches."""
    pad_token_id: int | None = LLADA_EOS_TOKEN_ID
    """Padding token id (EOS in LLaDA)."""
    tie_word_embeddings: bool = False
    """LLaDA's lm_head is a separate matrix; tying is not supported."""

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported: LLaDA's lm_head is untied")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class LLaDAOutput(ModelOutput):
    """`logits` (B, L, V); `kv` per layer (k, v) of the inputs when `return_kv=True`, else None;
    `hidden` (B, L, D) instead of logits when called with `logits=False`."""

    logits: torch.Tensor | None = None
    kv: list[KV] | None = None
    hidden: torch.Tensor | None = None


# ---- the pieces of a block --------------------------------------------------------------------

class LLaDARMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the statistics in fp32 whatever the model dtype, as LLaMA and LLaDA do
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (L, head_dim) for half-split RoPE, or (B, 1, L, head_dim) for per-row
    positions (B, L) (packed samples each start at 0); angles in fp32, cast to `dtype`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=positions.device) / head_dim)  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (L, D/2) or (B, L, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, L, D/2): broadcast over heads
    angles = torch.cat([angles, angles], dim=-1)  # (L, D): both halves rotate by the same angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # x (B, H, L, D), cos/sin (L, D) or (B, 1, L, D)


Spans = list[list[tuple[int, int]]]
"""Per row, the [start, end) runs of one packed sample each (row padding is a run of its own);
together they cover the row."""


def segment_spans(segments: torch.Tensor) -> Spans:
    """(B, L) segment ids -> per row the runs of equal ids, in order."""
    out = []
    for row in segments.cpu():
        cuts = (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()
        bounds = [0, *cuts, len(row)]
        out.append(list(zip(bounds[:-1], bounds[1:])))
    return out


def _span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    spans: Spans) -> torch.Tensor:
    """Attention of packed rows, each sample on its own: one SDPA call per span, so the cost is
    the sum of the samples' squared lengths, not the row's (a (L, L) block-diagonal mask made
    SDPA compute, then discard, every cross-sample score: 0.5x the samples/s of length-grouped
    batches on the CPU, bench/train_step.py). q, k, v: (B, H, L, D) -> (B, H, L, D). A fused
    variable-length kernel (flash-attn's varlen) would do the same in one call on GPUs; this is
    the path that runs everywhere."""
    rows = []
    for b, row in enumerate(spans):
        rows.append(torch.cat([F.scaled_dot_product_attention(
            q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e]) for s, e in row], dim=2))
    return torch.cat(rows)


class LLaDAAttention(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                prefix: KV | None, key_mask: torch.Tensor | None = None,
                spans: Spans | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,Hkv,L,D)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = k, v
        if prefix is not None:  # the inputs also see the cached prefix: (B, Hkv, P + L, D)
            k_all, v_all = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        groups = self.n_heads // self.n_kv_heads  # query head h reads KV head h // groups
        k_all, v_all = k_all.repeat_interleave(groups, 1), v_all.repeat_interleave(groups, 1)
        # Bidirectional. No mask unless some keys must be hidden (batch padding): a (B, 1, 1, K)
        # boolean key mask then, never a materialised L^2 one (digest §1.1).
        if spans is not None:  # packed rows: attention inside each sample's span only
            out = _span_attention(q, k_all, v_all, spans)
        else:
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=key_mask,
                                                 is_causal=False)
        out = out.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)  # (B, L, H*D)
        return self.o_proj(out), k, v


class LLaDAMLP(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LLaDADecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Returns (x, k, v)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.self_attn = LLaDAAttention(config)
        self.mlp = LLaDAMLP(config)
        self.input_layernorm = LLaDARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LLaDARMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                prefix: KV | None = None, key_mask: torch.Tensor | None = None,
                spans: Spans | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, prefix, key_mask, spans)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class LLaDABackbone(nn.Module):
    """Embedding, blocks and final norm: the `model.` prefix of the parameter names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDADecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = LLaDARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False  # set by activation_checkpointing_enable()

    def forward(self, x: torch.Tensor, prefix_kv: list[KV] | None, return_kv: bool,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> tuple[torch.Tensor, list[KV] | None]:
        prefix_len = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
        if positions is None:
            positions = torch.arange(prefix_len, prefix_len + x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions.to(x.device), self.config.head_dim,
                                self.config.rope_theta, x.dtype)
        key_mask = None
        if attention_mask is not None:  # (B, L) True = visible -> (B, 1, 1, P + L)
            visible = attention_mask.to(device=x.device, dtype=torch.bool)
            if prefix_len:
                visible = torch.cat([visible.new_ones(visible.shape[0], prefix_len), visible], 1)
            key_mask = visible[:, None, None, :]
        spans = None
        if segments is not None:  # packed rows: a query sees only its own sample's keys
            if key_mask is not None:
                raise ValueError("packed rows take segments, not an attention_mask")
            spans = segment_spans(segments)
        kv: list[KV] = []
        for i, layer in enumerate(self.layers):
            prefix = None if prefix_kv is None else prefix_kv[i]
            if self.gradient_checkpointing and self.training:
                x, k, v = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, prefix,
                                                            key_mask, spans)
            else:
                x, k, v = layer(x, cos, sin, prefix, key_mask, spans)
            if return_kv:
                kv.append((k, v))
        return self.norm(x), (kv if return_kv else None)


# ---- the model --------------------------------------------------------------------------------

class LLaDAModelLM(PreTrainedModel):
    """LLaDA as a PreTrainedModel: `model.{embed_tokens,layers.N.*,norm}` and `lm_head`."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDADecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDABackbone(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        self.post_init()  # HF's _init_weights: normal(0, initializer_range) linears, ones for norms

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    supports_packing = True
    """forward honours `segments` (a block-diagonal mask) and per-row `positions`; a model
    without this attribute is refused by a packed stage (train/step.py)."""

    def forward(self, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, *,
                prefix_kv: list[KV] | None = None, return_kv: bool = False,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, logits: bool = True) -> LLaDAOutput:
        """Logits for every input position, all positions attending to all (and to `prefix_kv`).

        input_ids (B, L) or inputs_embeds (B, L, D), exactly one. attention_mask: optional (B, L)
        bool, False at positions no other position may attend to (a sample's batch padding; the
        reference passes none: bidirectional over everything). prefix_kv: per layer (k, v) of
        shape (B, n_kv_heads, P, head_dim), already rotated (slices of an earlier `return_kv`);
        the inputs then sit at positions P..P+L-1. return_kv: also return the inputs' per-layer
        (k, v), rotated and before KV-head repetition, for the caller to slice into a prefix cache.
        positions: optional (B, L) RoPE positions and segments: optional (B, L) int, the packed
        sample each position belongs to (attention stays inside a segment); with both, every
        packed sample computes exactly what it would alone. logits=False returns `hidden`
        (B, L, D) after the final norm instead, for the step's masked-row head (`lm_head(rows,
        labels)`, model/head.py).
        """
        if prefix_kv is not None and (positions is not None or segments is not None):
            raise ValueError("prefix_kv cannot be combined with packed positions/segments")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if prefix_kv is not None and len(prefix_kv) != len(self.model.layers):
            raise ValueError(f"prefix_kv has {len(prefix_kv)} layers, the model "
                             f"{len(self.model.layers)}")
        x = inputs_embeds if input_ids is None else self.model.embed_tokens(input_ids)  # (B,L,D)
        hidden, kv = self.model(x, prefix_kv, return_kv, attention_mask, positions, segments)
        if not logits:
            return LLaDAOutput(kv=kv, hidden=hidden)
        return LLaDAOutput(logits=self.lm_head(hidden), kv=kv)  # logits (B, L, V)

    @classmethod
    def from_checkpoint(cls, folder_or_uri: str | Path, config: LLaDAConfig | None = None,
                        dtype: torch.dtype | str | None = None) -> LLaDAModelLM:
        """Load a LLaDA checkpoint folder (local path or s3:// URI) in either weight layout.

        Reads config.json (ours, or the official LLaDA one, see `config_from_official`) unless
        `config` is given, and the weights from model.safetensors, a sharded safetensors index, or
        pytorch_model.bin (sharded or not). `dtype` casts; by default the checkpoint's dtype stays.
        """
        from lladav import storage

        with storage.local_folder(str(folder_or_uri)) as folder:
            if config is None:
                raw = json.loads((folder / "config.json").read_text())
                official = "d_model" in raw  # OLMo-style names (the official LLaDA config)
                config = config_from_official(raw) if official else LLaDAConfig.from_dict(raw)
            state = load_llada_state_dict(_read_weights(folder, str(folder_or_uri)))
        with torch.device("meta"):  # no random init of 8B parameters only to overwrite them
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{folder_or_uri}: the weights do not match the config: "
                             f"missing {missing}, unexpected {unexpected}")
        model.load_state_dict(state, strict=True, assign=True)
        if dtype is not None:
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        model.config.dtype = next(model.parameters()).dtype
        return model.eval()


# ---- checkpoint layouts -----------------------------------------------------------------------

_OFFICIAL_TOP = {"model.transformer.wte.weight": "model.embed_tokens.weight",
                 "model.transformer.ln_f.weight": "model.norm.weight",
                 "model.transformer.ff_out.weight": "lm_head.weight"}
_OFFICIAL_BLOCK = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                   "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
                   "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
                   "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}
_OFFICIAL_BLOCK_KEY = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.weight$")
_OURS_KEY = re.compile(r"^(model\.embed_tokens|model\.norm|lm_head|model\.layers\.\d+\.("
                       r"self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|input_layernorm|"
                       r"post_attention_layernorm))\.weight$")


def load_llada_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official LLaDA names -> ours (digest §1.3); our names pass through unchanged.

    Unknown keys are kept (so a strict load names them) and logged as a warning; RoPE
    `inv_freq` buffers are dropped, being recomputed from rope_theta.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        block = _OFFICIAL_BLOCK_KEY.match(key)
        if key in _OFFICIAL_TOP:
            new = _OFFICIAL_TOP[key]
        elif block and block.group(2) in _OFFICIAL_BLOCK:
            new = f"model.layers.{block.group(1)}.{_OFFICIAL_BLOCK[block.group(2)]}.weight"
        elif key.endswith(".inv_freq"):
            continue
        else:
            new = key
            if not _OURS_KEY.match(key):
                unknown.append(key)
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r} (mixed layouts?)")
        out[new] = tensor
    if unknown:
        log.warning("LLaDA state dict: %d key(s) in neither the official nor the LLaMA layout: %s",
                    len(unknown), unknown)
    return out


def config_from_official(raw: dict[str, Any]) -> LLaDAConfig:
    """Our config from an official LLaDA (OLMo-style) config.json.

    Reads d_model, n_layers, n_heads, n_kv_heads (null = n_heads), mlp_hidden_size,
    embedding_size (else vocab_size), max_sequence_length, rope_theta, rms_norm_eps (or
    layer_norm_eps), init_std and the token ids; refuses the settings this model does not have.
    """
    unsupported = {"weight_tying": True, "include_bias": True, "alibi": True, "rope": False}
    for field, bad in unsupported.items():
        if raw.get(field) == bad:
            raise ValueError(f"official LLaDA config has {field}={bad}, which LLaDAModelLM does "
                             "not implement")
    if raw.get("layer_norm_type", "rms") != "rms" or raw.get("block_type", "llama") != "llama":
        raise ValueError(f"only layer_norm_type 'rms' and block_type 'llama' are supported, got "
                         f"{raw.get('layer_norm_type')!r} / {raw.get('block_type')!r}")
    if raw.get("mlp_hidden_size") is None:
        raise ValueError("official LLaDA config has no mlp_hidden_size; pass config= explicitly")
    fields = dict(
        vocab_size=raw.get("embedding_size") or raw["vocab_size"], hidden_size=raw["d_model"],
        intermediate_size=raw["mlp_hidden_size"], num_hidden_layers=raw["n_layers"],
        num_attention_heads=raw["n_heads"], num_key_value_heads=raw.get("n_kv_heads"),
        rms_norm_eps=raw.get("rms_norm_eps", raw.get("layer_norm_eps", LLaDAConfig.rms_norm_eps)),
        rope_theta=raw.get("rope_theta", LLaDAConfig.rope_theta),
        max_position_embeddings=raw.get("max_sequence_length", LLaDAConfig.max_position_embeddings),
        initializer_range=raw.get("init_std", 0.02),
    )
    for token in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        if raw.get(token) is not None:
            fields[token] = raw[token]
    return LLaDAConfig(**fields)


def _read_weights(folder: Path, uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).exists():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            break
    else:
        shards = [n for n in ("model.safetensors", "pytorch_model.bin")
                  if (folder / n).exists()][:1]
    if not shards:
        raise FileNotFoundError(f"{uri}: no model.safetensors, pytorch_model.bin or shard index")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = folder / shard
        state.update(load_file(path) if shard.endswith(".safetensors")
                     else torch.load(path, map_location="cpu", weights_only=True))
    return state


def register_auto(config_class: type[PretrainedConfig] = LLaDAConfig,
                  model_class: type[PreTrainedModel] = LLaDAModelLM) -> None:
    """Make AutoConfig / AutoModel resolve `config_class.model_type` to these classes (idempotent):
    "llada" by default; model/lladav.py registers "llada_v" with it."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)


register_auto()
