"""LLaDA-V's assembly: image token counts, splicing, export round trip, component groups."""

import pytest
import torch
from PIL import Image

from lladav.config import VisionGeometry
from lladav.data.conversation import IMAGE_PLACEHOLDER_ID
from lladav.data.images import image_token_count
from lladav.model.flavors import lladav_config
from lladav.model.lladav import LLaDAVConfig, LLaDAVModel


@pytest.fixture(scope="module")
def model() -> LLaDAVModel:
    torch.manual_seed(0)
    return LLaDAVModel(lladav_config("tiny", vocab_size=64, mask_token_id=5, eos_token_id=1)).eval()


# (W, H) spanning every branch: one tile, wide/tall letterboxing, the max_4 shrink, tiny images.
SIZES = [(32, 32), (48, 48), (64, 48), (48, 64), (100, 30), (30, 100), (200, 200), (17, 90), (150, 96)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("aspect", ["anyres_max_4", "square"])
def test_image_tokens_follow_from_size(model, size, aspect):
    img = Image.new("RGB", size, (120, 30, 60))
    tiles = model.pixel_tiles(img, aspect)
    with torch.no_grad():
        feats = model.encode_tiles(tiles)
        tokens = model.assemble(feats, size, aspect)
    geometry = model.config.geometry
    assert tokens.shape == (image_token_count(*size, geometry, aspect), model.config.text_config.hidden_size)
    g = geometry.patches_per_side
    if aspect == "square":
        assert tiles.shape[0] == 1 and tokens.shape[0] == g * g


def test_so400m_geometry_counts_from_the_paper():
    geometry = LLaDAVConfig(vision_config={"image_size": 384, "patch_size": 14}).geometry
    assert geometry == VisionGeometry(image_aspect="anyres_max_4")
    assert [image_token_count(w, h, geometry, "anyres_max_4") for w, h in
            [(384, 384), (640, 480), (1024, 768)]] == [1485, 2929, 3627]


def test_spliced_length_is_text_minus_placeholders_plus_image_tokens(model):
    sizes = [[(64, 48)], [(30, 100), (48, 48)], []]
    ids = [torch.tensor([7, 8, IMAGE_PLACEHOLDER_ID, 9, 10]),
           torch.tensor([IMAGE_PLACEHOLDER_ID, 11, IMAGE_PLACEHOLDER_ID, 12]),
           torch.tensor([13, 14, 15])]
    images = [[model.pixel_tiles(Image.new("RGB", s), n_images=len(ss)) for s in ss] for ss in sizes]
    with torch.no_grad():
        embeds, image_pos = model.embed_multimodal(ids, images, sizes)
    geometry = model.config.geometry
    lengths = [len(i) - int((i == IMAGE_PLACEHOLDER_ID).sum())
               + sum(image_token_count(w, h, geometry, "anyres_max_4", len(ss)) for w, h in ss)
               for i, ss in zip(ids, sizes)]
    assert embeds.shape[:2] == (3, max(lengths))
    assert image_pos.sum(1).tolist() == [n - (len(i) - int((i == IMAGE_PLACEHOLDER_ID).sum()))
                                         for n, i in zip(lengths, ids)]
    # text embeddings sit where the text was; the padding is the EOS embedding
    emb = model.get_input_embeddings().weight
    assert torch.equal(embeds[0, :2], emb[torch.tensor([7, 8])])
    assert torch.equal(embeds[2, 3:], emb[1].expand(max(lengths) - 3, -1))


def test_export_round_trip_gives_same_logits(model, tmp_path):
    from transformers import AutoModel

    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, local_files_only=True).eval()
    assert isinstance(loaded, LLaDAVModel)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = [torch.tensor([3, IMAGE_PLACEHOLDER_ID, 4])]
    images = [[model.pixel_tiles(Image.new("RGB", (64, 48), (9, 99, 199)))]]
    with torch.no_grad():
        a = model(inputs_embeds=model.embed_multimodal(ids, images, [[(64, 48)]])[0]).logits
        b = loaded(inputs_embeds=loaded.embed_multimodal(ids, images, [[(64, 48)]])[0]).logits
    assert torch.equal(a, b)


def test_stage1_grouping_trains_only_the_projector(model):
    import copy

    m = copy.deepcopy(model).train()
    groups = m.component_parameters()
    assert {n for n, _ in groups["projector"]} == {"mm_projector.0.weight", "mm_projector.0.bias",
                                                   "mm_projector.2.weight", "mm_projector.2.bias",
                                                   "image_newline.weight"}
    assert sum(len(v) for v in groups.values()) == len(list(m.parameters()))
    for name, params in groups.items():
        for _, p in params:
            p.requires_grad_(name == "projector")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for _, p in groups["projector"]], lr=0.1)
    ids = [torch.tensor([3, IMAGE_PLACEHOLDER_ID, 4, 6])]
    images = [[m.pixel_tiles(Image.new("RGB", (64, 48), (9, 99, 199)))]]
    embeds, _ = m.embed_multimodal(ids, images, [[(64, 48)]])
    m(inputs_embeds=embeds).logits.float().logsumexp(-1).mean().backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("mm_projector", "image_newline")) for n in changed)
    assert {n for n, _ in groups["projector"]} >= changed


def test_stage1_init_from_separate_llada_and_siglip_checkpoints(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from lladav.model.flavors import FLAVORS, llada_config
    from lladav.model.llada import LLaDAModelLM

    torch.manual_seed(1)
    lm = LLaDAModelLM(llada_config("tiny"))
    lm.save_pretrained(tmp_path / "llada")
    tower = SiglipVisionModel(SiglipVisionConfig(**FLAVORS["tiny"]["vision_tower"]))
    tower.save_pretrained(tmp_path / "siglip")

    model = LLaDAVModel.from_components(f"file://{tmp_path / 'llada'}", str(tmp_path / "siglip"))
    assert model.config.vision_config.num_hidden_layers == 3   # the full tower's config is kept
    assert len(model.vision_tower.encoder.layers) == 2         # features of layer -2: one less runs
    full = tower.state_dict()
    for name, p in model.vision_tower.state_dict().items():
        assert torch.equal(p, full[name]), name
    for name, p in model.language_model.state_dict().items():
        assert torch.equal(p, lm.state_dict()[name]), name
    # The truncated tower's output equals the full tower's penultimate hidden state.
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.vision_tower(pixel_values=pixels).last_hidden_state
        ref = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(ours, ref, atol=1e-6)
