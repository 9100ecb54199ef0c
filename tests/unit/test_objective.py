"""The training objective at the paper's lengths: the masked-row head, packing, complementary
masking and per-sample mask seeds (model/head.py, train/step.py, diffusion.py, data/loader.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lladav.config import EndOfAnswer, Objective, Packing, StageConfig, VisionGeometry
from lladav.data.conversation import ChatTokenizer, normalize_turns, tokenize
from lladav.data.images import image_tiles
from lladav.data.loader import _collate, _Planned, pack_batches
from lladav.diffusion import diffusion_loss, mask_seed, sample_masks
from lladav.model.flavors import lladav_config_for
from lladav.model.head import row_cross_entropy
from lladav.model.lladav import LLaDAVModel
from lladav.train import step as st

POLICY = EndOfAnswer(policy="eos_tail", eos_tokens=3)
GEOMETRY = VisionGeometry(image_aspect="square", tile_size=32, patch_size=8, max_grid=2)
QA = {"a": ("<image>\nWhat colour is it?", "red", (200, 30, 30)),
      "b": ("<image>\nDescribe the shape at length, please.",
            "A red circle on the left, near the edge.", (30, 30, 200)),
      "c": ("How many corners does a square have?", "four", None),
      "a2": ("<image>\nWhich colour is this one?", "green", (30, 200, 30))}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer) -> ChatTokenizer:
    return ChatTokenizer.from_folder(tiny_tokenizer)


@pytest.fixture(scope="module")
def samples(tok):
    out = {}
    for key, (question, answer, colour) in QA.items():
        turns = normalize_turns([{"from": "human", "value": question},
                                 {"from": "gpt", "value": answer}], int(colour is not None))
        t = tokenize(turns, tok, "llava_llada")
        tiles, sizes = [], []
        if colour is not None:
            image = Image.new("RGB", (40, 40), colour)
            tiles, sizes = [torch.from_numpy(image_tiles(image, GEOMETRY, "square", 1))], [image.size]
        out[key] = (t.ids, t.targets, tiles, sizes)
    return out


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = LLaDAVModel(lladav_config_for("tiny", tok)).eval()
    m.config.image_aspect = "square"
    return m


def _collated(samples, keys, tok, packs=None):
    planned = _Planned(0, 0, 0, tuple((k, "shard", len(samples[k][0]), len(samples[k][3]))
                                      for k in keys),
                       rows=tuple(tuple(r) for r in packs) if packs else None)
    return _collate([samples[k] for k in keys], tok.eos_id, planned, POLICY, seed=7)


# ---- the masked-row head ------------------------------------------------------------------------

def test_the_chunked_row_head_matches_full_logits_in_value_and_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = (0.1 * torch.randn(1000, 32)).requires_grad_()
    labels = torch.randint(0, 1000, (300,))
    scale = torch.rand(300)
    ce, correct = row_cross_entropy(hidden, weight, labels, chunk=64)   # 5 chunks, one partial
    (ce * scale).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = F.linear(hidden, weight)
    reference = F.cross_entropy(logits.float(), labels, reduction="none")
    (reference * scale).sum().backward()
    torch.testing.assert_close(ce, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(correct, logits.argmax(-1) == labels)


def test_the_step_loss_and_gradients_equal_todays_full_logits_path(tok, samples, model):
    """diffusion_step (hidden states, head on masked rows) against the pre-change path: full
    (B, L, V) logits, then diffusion_loss, under the same masks."""
    batch = _collated(samples, ["a", "b", "c"], tok)
    objective = Objective(head_chunk=7)
    model.zero_grad()
    loss, _ = st.diffusion_step(model, batch, seed=3, objective=objective)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    rows = st.batch_rows(model, batch)
    (masked, p), = st.batch_masks(rows, batch.keys, 3, 0, objective)
    noisy = rows.embeds.clone()
    noisy = torch.where(masked[..., None], model.mask_embedding, noisy)
    logits = model(inputs_embeds=noisy, attention_mask=rows.attention).logits
    full = diffusion_loss(logits, rows.labels, masked, rows.targets, p)
    full.backward()
    assert int(masked.sum()) > 5
    torch.testing.assert_close(loss, full, atol=1e-5, rtol=1e-5)
    for name, p_ in model.named_parameters():
        if p_.grad is not None:
            torch.testing.assert_close(ours[name], p_.grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


# ---- packing ------------------------------------------------------------------------------------

def _packed_hidden(model, tok, samples, keys):
    """Each sample's hidden states (own positions) packed in one row, and alone."""
    packed_batch = _collated(samples, keys, tok, packs=[list(range(len(keys)))])
    rows = st.batch_rows(model, packed_batch)
    with torch.no_grad():
        out = model(inputs_embeds=rows.embeds, positions=rows.positions, segments=rows.segments)
    return rows, out.logits[0]


def test_packed_samples_compute_exactly_what_they_compute_alone(tok, samples, model):
    keys = ["a", "b", "c"]
    rows, logits = _packed_hidden(model, tok, samples, keys)
    assert rows.embeds.shape[0] == 1 and rows.sample_of[0].unique().tolist() == [0, 1, 2]
    for i, key in enumerate(keys):
        alone = _collated(samples, [key], tok)
        alone_rows = st.batch_rows(model, alone)
        with torch.no_grad():
            expected = model(inputs_embeds=alone_rows.embeds).logits[0]
        mine = rows.sample_of[0] == i
        assert int(mine.sum()) == expected.shape[0]            # its tokens, images and EOS tail
        assert rows.positions[0, mine].tolist() == list(range(expected.shape[0]))
        torch.testing.assert_close(logits[mine], expected, atol=1e-5, rtol=1e-5)


def test_changing_one_packed_sample_leaves_the_others_unchanged(tok, samples, model):
    before_rows, before = _packed_hidden(model, tok, samples, ["b", "c", "a"])
    after_rows, after = _packed_hidden(model, tok, samples, ["b", "c", "a2"])   # a replaced
    others = before_rows.sample_of[0] < 2                    # b and c: the same offsets in both
    n = int(others.sum())
    assert int((after_rows.sample_of[0] < 2).sum()) == n and bool(others[:n].all())
    torch.testing.assert_close(after[:n], before[:n], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[n:n + 5], before[n:n + 5])


def test_the_packed_loss_equals_the_unpacked_batchs(tok, samples, model):
    for objective in (Objective(), Objective(complementary=True)):
        unpacked = _collated(samples, ["a", "b", "c"], tok)
        packed = _collated(samples, ["a", "b", "c"], tok, packs=[[0, 2], [1]])
        with torch.no_grad():
            loss_u, m_u = st.diffusion_step(model, unpacked, seed=5, objective=objective)
            loss_p, m_p = st.diffusion_step(model, packed, seed=5, objective=objective)
        torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=1e-5)
        assert m_p["masked_tokens"] == m_u["masked_tokens"] > 0
        assert m_p["tokens"] == m_u["tokens"]


def test_a_model_that_cannot_honour_the_mask_is_refused(tok, samples, model):
    packed = _collated(samples, ["a", "c"], tok, packs=[[0, 1]])

    class NoPacking(torch.nn.Module):
        config = model.config

        def embed_multimodal(self, *args, **kwargs):
            return model.embed_multimodal(*args, **kwargs)

    with pytest.raises(TypeError, match="cannot keep packed samples apart"):
        st.batch_rows(NoPacking(), packed)


def test_pack_batches_places_every_sample_once_under_the_budget():
    lengths = [int(x) for x in torch.randint(20, 400, (500,), generator=torch.Generator().manual_seed(1))]
    keys = [f"k{i}" for i in range(500)]
    batches = pack_batches(keys, lengths, seed=0, epoch=0, rows_per_batch=4, budget=1024, window=64)
    rows = [row for b in batches for row in b]
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    assert all(len(b) == 4 for b in batches[:-1])
    fill = sum(lengths) / (len(rows) * 1024)
    assert fill > 0.9, fill
    assert batches == pack_batches(keys, lengths, 0, 0, 4, 1024, 64)
    assert batches != pack_batches(keys, lengths, 0, 1, 4, 1024, 64)
    with pytest.raises(ValueError, match="k3 with 2000 tokens"):
        pack_batches(keys, lengths[:3] + [2000] + lengths[4:], 0, 0, 4, 1024, 64)


def test_packing_needs_own_eos_tails():
    base = dict(name="s", init={"flavor": "tiny"}, mixture="m", output="o",
                trainable={"projector": 1e-3}, packing={"token_budget": 512})
    assert StageConfig.model_validate(base).packing == Packing(token_budget=512)
    with pytest.raises(ValueError, match="packing needs end_of_answer.policy eos_tail"):
        StageConfig.model_validate({**base, "end_of_answer": {"policy": "pad_to_longest"}})


# ---- complementary masking, t range, per-sample seeds ----------------------------------------------

def test_every_target_is_masked_in_exactly_one_of_the_complementary_pair(tok, samples, model):
    for seed in range(20):
        batch = _collated(samples, ["a", "b", "c"], tok)
        rows = st.batch_rows(model, batch)
        (m1, p1), (m2, p2) = st.batch_masks(rows, batch.keys, seed, 0, Objective(complementary=True))
        assert torch.equal(m1 ^ m2, rows.targets)           # each target in exactly one
        assert not (m1 & m2).any() and not ((m1 | m2) & ~rows.targets).any()
        torch.testing.assert_close(p2, (1 - p1).clamp(min=1e-3))


def test_the_tower_runs_once_per_sample_batch_under_complementary_masking(tok, samples, model):
    batch = _collated(samples, ["a", "b", "c"], tok)
    calls = {"tower": 0, "projector": 0, "lm": 0}
    hooks = [model.vision_tower.register_forward_hook(lambda *a: calls.__setitem__("tower", calls["tower"] + 1)),
             model.mm_projector.register_forward_hook(lambda *a: calls.__setitem__("projector", calls["projector"] + 1)),
             model.language_model.model.register_forward_hook(lambda *a: calls.__setitem__("lm", calls["lm"] + 1))]
    try:
        with torch.no_grad():
            st.diffusion_step(model, batch, seed=1, objective=Objective(complementary=True))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"tower": 1, "projector": 1, "lm": 1}


def test_t_range_bounds_every_draw():
    targets = torch.ones(200, 16, dtype=torch.bool)
    sample_of = torch.arange(200)[:, None].expand(200, 16)
    _, p, t = sample_masks(targets, sample_of, list(range(200)), t_range=(0.4, 0.6))
    assert float(t.min()) >= 0.4 and float(t.max()) < 0.6 and t.std() > 0.03
    with pytest.raises(ValueError, match="t_range"):
        Objective(t_range=(0.5, 0.5))


def test_a_samples_masks_do_not_depend_on_its_batch_or_rank(tok, samples, model):
    """Masks come from mask_seed(seed, epoch, key): alone, beside others, packed or not."""
    def masks_of(keys, key, packs=None):
        batch = _collated(samples, keys, tok, packs)
        rows = st.batch_rows(model, batch)
        (masked, _), = st.batch_masks(rows, batch.keys, 11, 0, Objective())
        i = keys.index(key)
        return masked[rows.sample_of == i]

    alone = masks_of(["a"], "a")
    assert alone.any()
    assert torch.equal(masks_of(["b", "a"], "a")[:len(alone)], alone)
    assert torch.equal(masks_of(["b", "a", "c"], "a", packs=[[0, 1], [2]]), alone)
    assert mask_seed(11, 0, "a") != mask_seed(11, 1, "a") != mask_seed(12, 0, "a")


# ---- elastic resume: the accumulation that keeps the global batch --------------------------------

def test_resume_accumulation_keeps_the_global_batch_or_says_why():
    from lladav.train.loop import ElasticError, resume_accumulation

    saved = {"world_size": 2, "micro_batch": 2, "grad_accum": 2}       # 8 samples per step
    assert resume_accumulation(saved, 2, 1) == 4
    assert resume_accumulation(saved, 2, 4) == 1
    with pytest.raises(ElasticError, match=r"global batch of 8 samples \(2 workers x micro_batch 2 "
                                           r"x grad_accum 2\); 3 workers"):
        resume_accumulation(saved, 2, 3)
    with pytest.raises(ElasticError, match="8 workers x micro_batch 2 cannot make it"):
        resume_accumulation(saved, 2, 8)
    with pytest.raises(ElasticError, match="without its batch topology"):
        resume_accumulation({"world_size": 2, "micro_batch": None, "grad_accum": None}, 2, 1)


def test_the_step_line_carries_the_global_loss_grad_norm_and_rates():
    from lladav.train.loop import step_line

    line = step_line("s2", {"step": 10, "total_steps": 100, "loss": 2.5, "grad_norm": 0.75,
                            "lr": 1e-5, "lr/projector": 1e-5, "lr/language_model": 2e-6,
                            "samples_per_s": 12.5, "tokens_per_s": 4000.0,
                            "padding_fraction": 0.031, "answer_loss": 3.25})
    assert line == ("stage s2 step 10/100 | loss 2.5000 | answer_loss 3.2500 | grad_norm 0.75 | "
                    "lr projector=1.00e-05 language_model=2.00e-06 | 12.5 samples/s | "
                    "4000 tokens/s | pad 3.1%")
