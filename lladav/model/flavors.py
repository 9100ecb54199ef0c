"""Named model configurations: the tiny CPU model next to the paper's, sharing every line of code.

Owns: the numbers of every configuration but the model's defaults. `FLAVORS` is a plain dict of
dicts (torchtitan's flavour table), each entry what differs from LLaDAConfig's defaults (which
are LLaDA-8B's, in llada.py: the table depends on the model args, never the other way round):

    FLAVORS[name] = {"language_model": {<LLaDAConfig field>: value, ...}}

A multimodal flavour (added with lladav.py) puts its vision tower and projector settings beside
"language_model" under their own keys in the same entry; `llada_config` reads only
"language_model". No code path checks for a flavour's name: tiny and 8B differ only here.
Does not own: what the fields mean (LLaDAConfig's field docstrings in llada.py).

Importing this module pulls in no torch; `llada_config` imports the model module when called.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lladav.model.llada import LLaDAConfig

FLAVORS: dict[str, dict[str, dict[str, Any]]] = {
    # 2 layers, 64 wide, GQA (4 query heads share 2 KV heads): the CPU demo and the tests.
    # Vocabulary and token ids are the synthetic tokenizer's (data/synthetic.py puts BOS, EOS, MASK
    # first); a caller with another tokenizer overrides them from it.
    "tiny": {
        "language_model": {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 2048,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
            "mask_token_id": 2,
        },
        # A 3-layer SigLIP on 32 px tiles of 8 px patches (4x4 = 16 patches per tile); features
        # from layer -2 as in the paper, so 2 layers run.
        "vision_tower": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                         "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        "llada_v": {"vision_feature_layer": -2, "image_aspect": "anyres_max_4", "max_grid": 2,
                    "max_tiles_area": 4},
    },
    # LLaDA-8B-Instruct as LLaDA-V uses it: LLaDAConfig's own defaults (model/llada.py).
    "llada-8b": {"language_model": {}},
}
# LLaDA-V-8B: LLaDA-8B + SigLIP2 so400m/14 at 384 px (27x27 = 729 patches), anyres_max_4 over a
# (1x1)..(6x6) grid (lladav_reference.md "Model" and "Images").
FLAVORS["llada-v-8b"] = {
    "language_model": FLAVORS["llada-8b"]["language_model"],
    "vision_tower": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                     "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                     "layer_norm_eps": 1e-6},
    "llada_v": {"vision_feature_layer": -2, "image_aspect": "anyres_max_4", "max_grid": 6,
                "max_tiles_area": 4},
}


def llada_config(flavor: str, **overrides: Any) -> LLaDAConfig:
    """The LLaDAConfig of a named flavour, with `overrides` (LLaDAConfig fields) applied on top."""
    from lladav.model.llada import LLaDAConfig

    if flavor not in FLAVORS:
        raise KeyError(f"unknown flavor {flavor!r}; valid flavors: {sorted(FLAVORS)}")
    if "language_model" not in FLAVORS[flavor]:
        raise KeyError(f"flavor {flavor!r} has no 'language_model' settings")
    valid = {f.name for f in dataclasses.fields(LLaDAConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"unknown LLaDAConfig field(s) {unknown} overriding flavor {flavor!r}; "
                        f"valid fields: {sorted(valid)}")
    return LLaDAConfig(**{**FLAVORS[flavor]["language_model"], **overrides})


def lladav_config(flavor: str, **overrides: Any) -> Any:
    """The LLaDAVConfig of a named multimodal flavour; `overrides` apply to its language model
    (e.g. the vocabulary and special ids of the tokenizer in use)."""
    from lladav.model.lladav import LLaDAVConfig

    entry = FLAVORS.get(flavor)
    if entry is None or "vision_tower" not in entry:
        valid = sorted(n for n, f in FLAVORS.items() if "vision_tower" in f)
        raise KeyError(f"unknown LLaDA-V flavor {flavor!r}; valid flavors: {valid}")
    return LLaDAVConfig(text_config=llada_config(flavor, **overrides),
                        vision_config=dict(entry["vision_tower"]), **entry["llada_v"])


def lladav_config_for(flavor: str, tokenizer: Any) -> Any:
    """`lladav_config(flavor)` with the vocabulary and special ids of a ChatTokenizer
    (data/conversation.py): a random initialisation that speaks that tokenizer, EOS padding."""
    return lladav_config(flavor, vocab_size=len(tokenizer.tokenizer), bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id,
                         mask_token_id=tokenizer.mask_id)
