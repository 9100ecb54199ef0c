"""LLaDA-V: a SigLIP vision tower, the `mlp2x_gelu` projector and the LLaDA language model.

    pixels (n_tiles, 3, T, T) --tower, layer -2--> (n_tiles, g*g, Dv) --projector--> (n_tiles, g*g, D)
    --assemble (square | pad | anyres: base view + unpadded grid + row newlines)--> (n_img_tokens, D)
    --splice at each IMAGE_PLACEHOLDER_ID--> inputs_embeds (B, L', D) --LLaDA--> logits (B, L', V)

The number of image tokens follows from the image size alone (data/images.py owns those rules,
and `encode_image` asserts it agrees). Text-only samples still run a dummy image through the tower
and splice nothing, so every ZeRO-3 rank builds the same graph (lladav_reference.md, "Model").

Owns: the multimodal module, its config, splicing, parameter groups per component, loading the
real LLaDA and SigLIP checkpoints into it. Does not own: masking and the loss (diffusion.py),
sampling (sampler.py), DeepSpeed (train/engine.py), reading data (data/).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers import SiglipVisionConfig, SiglipVisionModel

from lladav.config import VisionGeometry
from lladav.data.conversation import IMAGE_PLACEHOLDER_ID
from lladav.data.images import anyres_layout, image_tiles, image_token_count
from lladav.model.llada import LLaDAConfig, LLaDAModelLM, register_auto

COMPONENTS = ("vision_tower", "projector", "language_model")


class LLaDAVConfig(PretrainedConfig):
    """LLaDA-V = `vision_config` (SigLIP) + projector + `text_config` (LLaDA).

    vision_feature_layer: which hidden state of the full tower feeds the projector (-2: the
        penultimate layer, before the post-layernorm, as the reference does by deleting the last
        layer). The tower is built truncated to that layer.
    image_aspect: default image handling, "anyres_max_4" (stages 2-3, inference) or "square" (stage 1).
    max_grid / max_tiles_area: grid pinpoints (1x1)..(NxN) and the anyres_max_N cap.
    """

    model_type = "llada_v"
    sub_configs = {"text_config": LLaDAConfig, "vision_config": SiglipVisionConfig}

    def __init__(self, text_config: dict | LLaDAConfig | None = None,
                 vision_config: dict | SiglipVisionConfig | None = None,
                 vision_feature_layer: int = -2, image_aspect: str = "anyres_max_4",
                 max_grid: int = 6, max_tiles_area: int = 4, **kwargs: Any):
        if isinstance(text_config, dict):
            text_config = LLaDAConfig(**text_config)
        if isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(**vision_config)
        self.text_config = text_config if text_config is not None else LLaDAConfig()
        self.vision_config = vision_config if vision_config is not None else SiglipVisionConfig()
        self.vision_feature_layer = vision_feature_layer
        self.image_aspect = image_aspect
        self.max_grid = max_grid
        self.max_tiles_area = max_tiles_area
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def geometry(self) -> VisionGeometry:
        return VisionGeometry(image_aspect=self.image_aspect, tile_size=self.vision_config.image_size,
                              patch_size=self.vision_config.patch_size, max_grid=self.max_grid,
                              max_tiles_area=self.max_tiles_area)


class ImageNewline(nn.Module):
    """The learned embedding appended after each row of anyres features.

    A module rather than a bare parameter: ZeRO-3 gathers a partitioned parameter only around
    its own module's forward, so a parameter read outside any forward would be empty.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden) / hidden**0.5)

    def forward(self) -> torch.Tensor:
        return self.weight


class LLaDAVModel(PreTrainedModel):
    config_class = LLaDAVConfig
    base_model_prefix = "llada_v"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDADecoderLayer", "SiglipEncoderLayer"]

    def __init__(self, config: LLaDAVConfig):
        super().__init__(config)
        vcfg = config.vision_config
        n_layers = vcfg.num_hidden_layers + config.vision_feature_layer + 1
        tower_cfg = SiglipVisionConfig(**{**vcfg.to_dict(), "num_hidden_layers": n_layers,
                                          "vision_use_head": False})
        self.vision_tower = SiglipVisionModel(tower_cfg)
        # Features are taken before the post-layernorm (the reference deletes the last layer);
        # an unused module would leave ZeRO-3 waiting for gradients that never come.
        self.vision_tower.post_layernorm = nn.Identity()
        hidden = config.text_config.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(vcfg.hidden_size, hidden), nn.GELU(),
                                          nn.Linear(hidden, hidden))
        self.image_newline = ImageNewline(hidden)
        self.language_model = LLaDAModelLM(config.text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and any(module is m for m in self.mm_projector.modules()):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    # -- components ---------------------------------------------------------------------------
    def component_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters per component (vision_tower, projector, language_model), for
        freezing and per-component learning rates. The newline embedding goes with the projector."""
        groups: dict[str, list] = {c: [] for c in COMPONENTS}
        for name, p in self.named_parameters():
            if name.startswith("vision_tower."):
                groups["vision_tower"].append((name, p))
            elif name.startswith(("mm_projector.", "image_newline")):
                groups["projector"].append((name, p))
            else:
                groups["language_model"].append((name, p))
        return groups

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @property
    def mask_embedding(self) -> torch.Tensor:
        """The [M] row, through the embedding's forward (so ZeRO-3 gathers it): (D,)."""
        embed = self.get_input_embeddings()
        return embed(torch.tensor([self.config.text_config.mask_token_id],
                                  device=embed.weight.device))[0]

    # -- images --------------------------------------------------------------------------------
    def pixel_tiles(self, image: Any, aspect: str | None = None, n_images: int = 1) -> torch.Tensor:
        """PIL image -> (n_tiles, 3, T, T) tiles for this model's tower."""
        aspect = aspect or self.config.image_aspect
        return torch.from_numpy(image_tiles(image, self.config.geometry, aspect, n_images))

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """(n_tiles, 3, T, T) -> projected patch features (n_tiles, g*g, D)."""
        tiles = tiles.to(dtype=self.mm_projector[0].weight.dtype)
        features = self.vision_tower(pixel_values=tiles).last_hidden_state  # (n, g*g, Dv)
        return self.mm_projector(features)                                   # (n, g*g, D)

    def assemble(self, features: torch.Tensor, size: tuple[int, int], aspect: str,
                 n_images: int = 1, newline: torch.Tensor | None = None) -> torch.Tensor:
        """One image's tile features (n_tiles, g*g, D) -> its token sequence (N, D)."""
        g = self.config.geometry.patches_per_side
        newline = self.image_newline() if newline is None else newline
        if aspect == "square":
            out = features[0]
        elif n_images > 1:
            out = torch.cat([features[0], newline[None].to(features.dtype)])
        else:
            lay = anyres_layout(size[0], size[1], self.config.geometry)
            d = features.shape[-1]
            grid = features[1:].view(lay.grid_h, lay.grid_w, g, g, d)            # (gh, gw, g, g, D)
            fmap = grid.permute(4, 0, 2, 1, 3).reshape(d, lay.grid_h * g, lay.grid_w * g)
            fmap = fmap[:, lay.top:lay.bottom, lay.left:lay.right]             # unpad
            if (lay.rows, lay.cols) != tuple(fmap.shape[1:]):
                fmap = F.interpolate(fmap[None], size=(lay.rows, lay.cols), mode="bilinear")[0]
            rows_nl = newline.to(fmap.dtype)[:, None, None].expand(d, lay.rows, 1)
            fmap = torch.cat([fmap, rows_nl], dim=2)                           # (D, rows, cols+1)
            out = torch.cat([features[0], fmap.flatten(1).transpose(0, 1)])
        expected = image_token_count(size[0], size[1], self.config.geometry, aspect, n_images)
        assert out.shape[0] == expected, (out.shape, expected)
        return out

    # -- splicing --------------------------------------------------------------------------------
    def embed_multimodal(self, input_ids: list[torch.Tensor], images: list[list[torch.Tensor]],
                         image_sizes: list[list[tuple[int, int]]], aspect: str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Splice image features into each sample and right-pad the batch with EOS embeddings.

        input_ids: per sample (L_b,) with IMAGE_PLACEHOLDER_ID where each image goes, in order.
        images / image_sizes: per sample, the tiles (n_tiles, 3, T, T) and (W, H) of each image.
        Returns inputs_embeds (B, L', D) and `image_positions` (B, L') bool (True at image
        features). Padding is EOS, as the reference pads (its targets are the caller's choice).

        Every module runs exactly once per call, whatever the batch holds (text-only samples
        send a dummy tile through the tower and splice nothing): under ZeRO-3 each module call
        gathers its parameters with a collective, so all ranks must make the same calls.
        """
        aspect = aspect or self.config.image_aspect
        embed = self.get_input_embeddings()
        device = embed.weight.device
        eos_id = self.config.text_config.eos_token_id
        newline = self.image_newline()
        all_tiles = [t for sample in images for t in sample]
        if all_tiles:
            feats = self.encode_tiles(torch.cat(all_tiles)).split([t.shape[0] for t in all_tiles])
            unused = newline.sum() * 0.0
        else:
            size = self.config.vision_config.image_size
            feats = ()
            unused = (self.encode_tiles(torch.zeros(1, 3, size, size)).sum() + newline.sum()) * 0.0
        # One embedding call for the whole batch (placeholders read as EOS, then replaced), and
        # one extra EOS column for the padding vector.
        width = max(len(ids) for ids in input_ids)
        table = torch.full((len(input_ids), width + 1), eos_id, dtype=torch.long, device=device)
        for i, ids in enumerate(input_ids):
            ids = ids.to(device)
            table[i, : len(ids)] = torch.where(ids == IMAGE_PLACEHOLDER_ID, eos_id, ids)
        text = embed(table)                                                   # (B, W + 1, D)
        eos = text[0, -1]
        seqs, img_pos, k = [], [], 0
        for i, (ids, sizes) in enumerate(zip(input_ids, image_sizes)):
            slots = (ids == IMAGE_PLACEHOLDER_ID).nonzero().flatten().tolist()
            if len(slots) != len(sizes):
                raise ValueError(f"{len(slots)} image placeholders but {len(sizes)} images")
            pieces, flags, start = [], [], 0
            for slot, size in zip(slots, sizes):
                img = self.assemble(feats[k], size, aspect, len(sizes), newline).to(text.dtype)
                pieces += [text[i, start:slot], img]
                flags += [torch.zeros(slot - start, dtype=torch.bool), torch.ones(len(img), dtype=torch.bool)]
                start, k = slot + 1, k + 1
            pieces.append(text[i, start:len(ids)])
            flags.append(torch.zeros(len(ids) - start, dtype=torch.bool))
            seqs.append(torch.cat(pieces))
            img_pos.append(torch.cat(flags))
        length = max(len(s) for s in seqs)
        out = torch.stack([torch.cat([s, eos.expand(length - len(s), -1)]) for s in seqs])
        pos = torch.stack([F.pad(p, (0, length - len(p))) for p in img_pos])
        return out + unused, pos.to(out.device)

    @property
    def supports_packing(self) -> bool:
        """Whether forward keeps packed samples apart (train/step.py refuses packing if not)."""
        return bool(getattr(self.language_model, "supports_packing", False))

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """The language model over given ids or already-spliced embeddings: logits, or with
        logits=False the hidden states (and positions/segments for packed rows; model/llada.py)."""
        return self.language_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    # -- loading the real checkpoints ------------------------------------------------------------
    @classmethod
    def from_components(cls, language_model: str, vision_tower: str, *,
                        vision_feature_layer: int = -2, image_aspect: str = "anyres_max_4",
                        dtype: torch.dtype | None = None) -> "LLaDAVModel":
        """Stage-1 init: LLaDA weights (official or LLaMA layout, folder or URI) + SigLIP weights
        (a Hugging Face SigLIP/SigLIP2 folder or URI); projector and newline randomly initialised."""
        from lladav import storage

        lm = LLaDAModelLM.from_checkpoint(language_model, dtype=dtype)
        with storage.local_folder(vision_tower) as folder:
            vcfg = AutoConfig.from_pretrained(folder, local_files_only=True)
            vcfg = getattr(vcfg, "vision_config", vcfg)
            config = LLaDAVConfig(text_config=lm.config, vision_config=vcfg,
                                  vision_feature_layer=vision_feature_layer, image_aspect=image_aspect)
            model = cls(config)
            tower = SiglipVisionModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
        kept = model.vision_tower.state_dict()
        missing = [k for k in kept if k not in tower.state_dict()]
        if missing:
            raise ValueError(f"{vision_tower}: SigLIP checkpoint lacks {missing[:5]}...")
        model.vision_tower.load_state_dict({k: tower.state_dict()[k] for k in kept})
        model.language_model.load_state_dict(lm.state_dict())
        return model.to(dtype) if dtype is not None else model


register_auto(LLaDAVConfig, LLaDAVModel)  # `AutoModel.from_pretrained(export)` for LLaDA-V folders
