"""The export -> answer path: prompt, image tiles, sampler, decode; and `lladav generate`."""

import subprocess
import sys

import pytest
from PIL import Image

from lladav.inference import SamplerSettings, answer, load


@pytest.fixture(scope="module")
def export(random_export, tmp_path_factory):
    img = tmp_path_factory.mktemp("image") / "shape.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(img)
    return random_export, img


def test_answer_is_deterministic_and_respects_the_sampler_settings(export):
    folder, img = export
    model, tok = load(str(folder))
    image = Image.open(img)
    settings = SamplerSettings(gen_length=8, block_length=4, steps=8)
    a = answer(model, tok, [image], "What colour is the shape?", settings)
    b = answer(model, tok, [image], "What colour is the shape?", settings)
    assert a == b
    assert len(a.token_ids) <= 8 and a.forward_passes <= 8
    banned = {tok.bos_id, tok.sh_id, tok.eh_id, tok.eos_id, tok.mask_id}
    assert not banned & set(a.token_ids)  # LLaDA-V's banned ids never come out; no [M] left
    fast = answer(model, tok, [image], "What colour is the shape?",
                  SamplerSettings(gen_length=8, block_length=4, steps=8, threshold=2.0))
    assert fast.token_ids == a.token_ids  # a threshold never reached is the baseline


def test_generate_command_prints_an_answer(export):
    folder, img = export
    run = subprocess.run([sys.executable, "-m", "lladav.cli", "generate", "--model", str(folder),
                          "--image", str(img), "--prompt", "<image>\nWhat shape is it?",
                          "--steps", "4", "--gen-length", "4", "--block-length", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    model, tok = load(str(folder))
    expected = answer(model, tok, [Image.open(img).convert("RGB")], "<image>\nWhat shape is it?",
                      SamplerSettings(gen_length=4, block_length=4, steps=4))
    assert run.stdout.strip() == expected.text
