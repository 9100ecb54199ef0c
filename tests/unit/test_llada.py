"""LLaDA LM (lladav/model/llada.py): against a plain re-implementation, both checkpoint layouts,
bidirectionality, EOS pads, the prefix key/value cache, checkpointing and the HF round trip."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel

from lladav.model.flavors import FLAVORS, llada_config
from lladav.model.llada import (LLaDAConfig, LLaDAModelLM, load_llada_state_dict,
                                register_auto)

EOS = 1


@pytest.fixture(scope="module")
def config() -> LLaDAConfig:
    # GQA (4 query heads over 2 KV heads), a larger init so small effects are far above rounding.
    return llada_config("tiny", vocab_size=96, initializer_range=0.2, rope_theta=10000.0,
                        eos_token_id=EOS, pad_token_id=EOS)


@pytest.fixture(scope="module")
def model(config) -> LLaDAModelLM:
    torch.manual_seed(0)
    m = LLaDAModelLM(config).eval()
    with torch.no_grad():  # norm weights away from 1, so a missing multiplication shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def random_ids(config, length: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (batch, length), generator=g)


# ---- an independent, deliberately plain forward pass ------------------------------------------

def reference_logits(sd: dict, config: LLaDAConfig, tokens: list[int]) -> torch.Tensor:
    """One sequence, float64, loops over layers, heads and rotation pairs; reads the state dict."""
    w = {k: v.double() for k, v in sd.items()}
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    D = config.hidden_size // H
    L = len(tokens)

    def rmsnorm(x, weight):
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + config.rms_norm_eps) * weight

    def rotate(vec, pos):  # pair (i, i + D/2) rotated by pos * theta^(-2i/D)
        out = vec.clone()
        for i in range(D // 2):
            angle = pos * config.rope_theta ** (-2 * i / D)
            a, b = vec[i], vec[i + D // 2]
            out[i] = a * math.cos(angle) - b * math.sin(angle)
            out[i + D // 2] = b * math.cos(angle) + a * math.sin(angle)
        return out

    x = torch.stack([w["model.embed_tokens.weight"][t] for t in tokens])  # (L, hidden)
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"])
        q = h @ w[p + "self_attn.q_proj.weight"].T
        k = h @ w[p + "self_attn.k_proj.weight"].T
        v = h @ w[p + "self_attn.v_proj.weight"].T
        heads = []
        for head in range(H):
            kv_head = head // (H // Hkv)
            qh = torch.stack([rotate(q[i, head * D:(head + 1) * D], i) for i in range(L)])
            kh = torch.stack([rotate(k[j, kv_head * D:(kv_head + 1) * D], j) for j in range(L)])
            vh = v[:, kv_head * D:(kv_head + 1) * D]
            scores = qh @ kh.T / math.sqrt(D)  # every position sees every position
            probs = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            heads.append((probs / probs.sum(dim=-1, keepdim=True)) @ vh)
        x = x + torch.cat(heads, dim=-1) @ w[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rmsnorm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T  # (L, V)


def test_matches_plain_reference_with_gqa(model, config):
    assert config.num_key_value_heads < config.num_attention_heads
    batch = random_ids(config, 11, seed=1, batch=2)
    with torch.no_grad():
        logits = model(batch).logits
    assert logits.shape == (2, 11, config.vocab_size) and logits.dtype == torch.float32
    sd = model.state_dict()
    for row in range(2):
        expected = reference_logits(sd, config, batch[row].tolist()).float()
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=0)


# ---- checkpoint layouts -----------------------------------------------------------------------

OURS_TO_OFFICIAL_BLOCK = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
                          "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
                          "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
                          "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm",
                          "post_attention_layernorm": "ff_norm"}


def official_name(key: str) -> str:
    top = {"model.embed_tokens.weight": "model.transformer.wte.weight",
           "model.norm.weight": "model.transformer.ln_f.weight",
           "lm_head.weight": "model.transformer.ff_out.weight"}
    if key in top:
        return top[key]
    _, _, n, rest = key.split(".", 3)  # model.layers.N.<module>.weight
    module = OURS_TO_OFFICIAL_BLOCK[rest.removesuffix(".weight")]
    return f"model.transformer.blocks.{n}.{module}.weight"


def write_official_checkpoint(folder, model, config) -> None:
    """The official LLaDA layout: renamed keys, 2 safetensors shards + index, OLMo-style config."""
    folder.mkdir()
    sd = {official_name(k): v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": config.hidden_size,
        "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads, "mlp_hidden_size": config.intermediate_size,
        "mlp_ratio": 4, "vocab_size": config.vocab_size, "embedding_size": config.vocab_size,
        "max_sequence_length": config.max_position_embeddings, "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps, "mask_token_id": config.mask_token_id,
        "eos_token_id": EOS, "pad_token_id": EOS, "layer_norm_type": "rms",
        "block_type": "llama", "activation_type": "silu", "include_bias": False,
        "weight_tying": False, "rope": True, "alibi": False, "init_std": 0.02}))


def test_official_and_llama_layouts_load_into_the_same_model(model, config, tmp_path):
    write_official_checkpoint(tmp_path / "official", model, config)
    assert len(list((tmp_path / "official").glob("*.safetensors"))) == 2
    model.save_pretrained(tmp_path / "llama")  # our layout, single model.safetensors
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(config.to_json_string())

    batch = random_ids(config, 9, seed=2, batch=2)
    with torch.no_grad():
        expected = model(batch).logits
    for folder in ("official", "llama", "bin"):
        loaded = LLaDAModelLM.from_checkpoint(f"file://{tmp_path / folder}")  # via storage
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "vocab_size", "rope_theta",
                      "rms_norm_eps", "mask_token_id", "eos_token_id"):
            assert getattr(loaded.config, field) == getattr(config, field), (folder, field)
        with torch.no_grad():
            assert torch.equal(loaded(batch).logits, expected), folder

    as_bf16 = LLaDAModelLM.from_checkpoint(tmp_path / "official", dtype=torch.bfloat16)
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}


def test_mismatched_weights_fail_naming_the_keys(model, config, tmp_path, caplog):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.transformer.blocks.0.mystery.weight"] = torch.zeros(3)
    with caplog.at_level(logging.WARNING, logger="lladav.model.llada"):
        renamed = load_llada_state_dict(sd)
    assert "model.transformer.blocks.0.mystery.weight" in renamed  # reported, not dropped
    assert "model.transformer.blocks.0.mystery.weight" in caplog.text

    (tmp_path / "ckpt").mkdir()
    save_file(sd, tmp_path / "ckpt" / "model.safetensors")
    (tmp_path / "ckpt" / "config.json").write_text(config.to_json_string())
    with pytest.raises(ValueError, match="missing") as err:
        LLaDAModelLM.from_checkpoint(tmp_path / "ckpt")
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.transformer.blocks.0.mystery.weight" in str(err.value)


# ---- attention semantics ----------------------------------------------------------------------

def test_attention_is_bidirectional(model, config):
    base = random_ids(config, 10, seed=3)
    changed = base.clone()
    changed[0, -1] = (base[0, -1] + 1) % config.vocab_size
    with torch.no_grad():
        first_base, first_changed = model(base).logits[0, 0], model(changed).logits[0, 0]
    assert (first_base - first_changed).abs().max() > 1e-4  # position 0 sees the last token


def test_eos_pads_are_attended_and_rows_do_not_leak(model, config):
    short = random_ids(config, 6, seed=4)
    padded = torch.cat([short, torch.full((1, 3), EOS)], dim=1)  # right-padded with EOS
    other = random_ids(config, 9, seed=5)
    with torch.no_grad():
        alone_short, alone_padded = model(short).logits, model(padded).logits
        alone_other = model(other).logits
        batched = model(torch.cat([padded, other])).logits
    # No attention mask: the pads change what the real tokens see.
    assert (alone_short[0] - alone_padded[0, :6]).abs().max() > 1e-4
    # But a row never sees another row.
    torch.testing.assert_close(batched[0], alone_padded[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], alone_other[0], atol=1e-5, rtol=0)


def test_prefix_kv_reproduces_the_full_forward(model, config):
    full_ids, prefix_len = random_ids(config, 12, seed=6, batch=2), 5
    with torch.no_grad():
        full = model(full_ids, return_kv=True)
        prefix_kv = [(k[:, :, :prefix_len], v[:, :, :prefix_len]) for k, v in full.kv]
        suffix = model(full_ids[:, prefix_len:], prefix_kv=prefix_kv, return_kv=True)
        no_prefix = model(full_ids[:, prefix_len:])
    assert len(full.kv) == config.num_hidden_layers
    assert full.kv[0][0].shape == (2, config.num_key_value_heads, 12, config.head_dim)
    torch.testing.assert_close(suffix.logits, full.logits[:, prefix_len:], atol=1e-5, rtol=0)
    for (k, v), (full_k, full_v) in zip(suffix.kv, full.kv):  # rotated at positions P..P+L-1
        torch.testing.assert_close(k, full_k[:, :, prefix_len:], atol=1e-5, rtol=0)
        torch.testing.assert_close(v, full_v[:, :, prefix_len:], atol=1e-5, rtol=0)
    assert (no_prefix.logits - full.logits[:, prefix_len:]).abs().max() > 1e-4
    assert model(full_ids).kv is None


def test_inputs_embeds_equals_input_ids(model, config):
    batch = random_ids(config, 7, seed=7, batch=2)
    with torch.no_grad():
        from_ids = model(input_ids=batch).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(batch)).logits
    assert torch.equal(from_ids, from_embeds)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=batch, inputs_embeds=model.get_input_embeddings()(batch))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    assert model.get_output_embeddings() is model.lm_head


# ---- training support and the Hugging Face round trip -----------------------------------------

def test_gradient_checkpointing_same_loss_and_grads(config):
    torch.manual_seed(1)
    model = LLaDAModelLM(config).train()
    batch, targets = random_ids(config, 8, seed=8, batch=2), random_ids(config, 8, seed=9, batch=2)
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def loss_and_grads():
        model.zero_grad()
        calls.clear()
        logits = model(batch).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss_off, grads_off, calls_off = loss_and_grads()
    model.activation_checkpointing_enable()
    assert model.model.gradient_checkpointing
    loss_on, grads_on, calls_on = loss_and_grads()
    # Each layer ran again in the backward pass: checkpointing really recomputed.
    assert (calls_off, calls_on) == (config.num_hidden_layers, 2 * config.num_hidden_layers)
    torch.testing.assert_close(loss_on, loss_off, atol=1e-6, rtol=0)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-6, rtol=0, msg=name)


def test_save_pretrained_round_trips_through_automodel(model, config, tmp_path):
    model.save_pretrained(tmp_path / "export")
    register_auto()
    register_auto()  # idempotent
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "export"), LLaDAConfig)
    loaded = AutoModel.from_pretrained(tmp_path / "export")
    assert type(loaded) is LLaDAModelLM
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    batch = random_ids(config, 8, seed=10, batch=2)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(batch).logits, model(batch).logits)


# ---- configs and flavours ---------------------------------------------------------------------

def test_flavors_and_config_validation():
    big = llada_config("llada-8b")
    assert (big.num_hidden_layers, big.hidden_size, big.num_attention_heads,
            big.num_key_value_heads, big.intermediate_size, big.vocab_size,
            big.max_position_embeddings, big.mask_token_id) == (32, 4096, 32, 32, 12288, 126464,
                                                                16384, 126336)
    assert big.to_dict() == LLaDAConfig().to_dict()  # the defaults are LLaDA-8B
    assert llada_config("tiny", vocab_size=300).vocab_size == 300
    with pytest.raises(KeyError, match="llada-8b.*tiny|tiny.*llada-8b"):
        llada_config("huge")
    with pytest.raises(TypeError, match="hiden_size"):
        llada_config("tiny", hiden_size=32)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LLaDAConfig(**{**FLAVORS["tiny"]["language_model"], "num_key_value_heads": 3})
