"""The grafted Qwen3-VL teacher: graft correctness, input building, feature extraction."""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lowvram_dopsd import tiny
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.teacher_vlm import (VlmInputBuilder, encode_vlm, graft_language_model, load_grafted_vlm,
                                       vlm_features, vlm_messages)


@pytest.fixture(scope="module")
def grafted(tiny_vlm_dir, tiny_zimage_dir):
    return load_grafted_vlm(tiny_vlm_dir, tiny_zimage_dir / "text_encoder", "cpu", torch.float32)


@pytest.fixture(scope="module")
def ball():
    return Image.open(sorted(tiny.DEMO_DIR.glob("*.png"))[0]).convert("RGB")


def _fresh_vlm(tiny_vlm_dir):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(tiny_vlm_dir, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Graft

def test_graft_replaces_every_lm_param_and_keeps_vision(grafted, tiny_vlm_dir, tiny_zimage_dir):
    model, _ = grafted
    te = load_file(tiny_zimage_dir / "text_encoder" / "model.safetensors")
    lm = dict(model.model.language_model.named_parameters())
    assert set(lm) == {k.removeprefix("model.") for k in te if not k.startswith("lm_head.")}
    for name, p in lm.items():
        assert torch.equal(p, te["model." + name]), name

    original = _fresh_vlm(tiny_vlm_dir)
    # The VLM's own LM weights were different (the graft changed something) ...
    assert not torch.equal(original.model.language_model.layers[0].mlp.up_proj.weight, lm["layers.0.mlp.up_proj.weight"])
    # ... and the vision tower, merger and DeepStack mergers are untouched.
    vision = dict(model.model.visual.named_parameters())
    assert any(n.startswith("merger.") for n in vision) and any(n.startswith("deepstack_merger_list.") for n in vision)
    for name, p in original.model.visual.named_parameters():
        assert torch.equal(p, vision[name]), name
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_grafted_vlm_on_text_reproduces_the_text_encoder(grafted, tiny_zimage_dir):
    """Without an image the grafted VLM is the text encoder (the tiny pair shares rope theta)."""
    from transformers import AutoTokenizer, Qwen3Model

    model, _ = grafted
    te = Qwen3Model.from_pretrained(tiny_zimage_dir / "text_encoder", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_zimage_dir / "tokenizer")
    ids = tok(["<|im_start|>user\na photo of sks ball<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        expected = te(**ids, output_hidden_states=True).hidden_states
        got = model(**ids, output_hidden_states=True, use_cache=False).hidden_states
    assert len(got) == len(expected) == te.config.num_hidden_layers + 1
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims, expected", [
    # Other width: every shared tensor has the wrong shape; VLM layers 4..35 have nothing (32 x 11 params).
    (dict(hidden_size=48, num_hidden_layers=4),
     ["model.embed_tokens.weight (576, 48) vs (576, 32)", "352 VLM language-model parameters have no",
      "hidden 48, 4 layers", "hidden 32, 36 layers"]),
    # Same width, two layers more: 22 text-encoder tensors have no place in the VLM.
    (dict(num_hidden_layers=38), ["22 text-encoder tensors have no place", "model.layers.36."]),
])
def test_mismatched_text_encoder_raises_user_error(tmp_path, tiny_vlm_dir, dims, expected):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=576, tie_word_embeddings=True, **dict(tiny.TEXT_ENCODER_DIMS, **dims))
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "te")
    model = _fresh_vlm(tiny_vlm_dir)
    before = {n: p.clone() for n, p in model.model.language_model.named_parameters()}
    with pytest.raises(UserError) as err:
        graft_language_model(model, tmp_path / "te")
    msg = str(err.value)
    assert "do not match" in msg
    for part in expected:
        assert part in msg, part
    # Checked from the headers first: nothing was modified.
    assert all(torch.equal(p, before[n]) for n, p in model.model.language_model.named_parameters())


def test_graft_accepts_bare_qwen3model_keys_and_shards(tmp_path, tiny_vlm_dir, tiny_zimage_dir):
    """A text encoder saved from Qwen3Model (no `model.` prefix) in several shards grafts the same."""
    from transformers import Qwen3Model

    te = Qwen3Model.from_pretrained(tiny_zimage_dir / "text_encoder", dtype=torch.float32)
    te.save_pretrained(tmp_path / "te", max_shard_size="200KB")
    assert (tmp_path / "te" / "model.safetensors.index.json").is_file()
    model = _fresh_vlm(tiny_vlm_dir)
    assert graft_language_model(model, tmp_path / "te") == len(list(te.parameters()))
    for name, p in te.named_parameters():
        assert torch.equal(model.model.language_model.get_parameter(name), p), name


# ----------------------------------------------------------------------------------------------
# Inputs

def test_fallback_inputs_expand_image_placeholder(tiny_vlm_dir, ball):
    builder = VlmInputBuilder(tiny_vlm_dir, use_processor=False)
    assert builder.path == "fallback"
    inputs = builder("a photo of sks ball", ball, min_pixels=512 * 512, max_pixels=768 * 768)
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 32, 32]]  # 64x64 scaled up into the 512^2..768^2 band -> 512x512
    n_image = int(grid.prod()) // 4  # merge 2x2
    ids = inputs["input_ids"][0]
    assert int((ids == builder.image_token_id).sum()) == n_image == 256
    assert inputs["mm_token_type_ids"][0].tolist() == [int(i == builder.image_token_id) for i in ids.tolist()]
    assert inputs["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 16 * 16)
    assert inputs["attention_mask"].all() and inputs["attention_mask"].shape == ids[None].shape

    # A wide image keeps its aspect ratio inside the pixel band (sides multiples of 32 = patch x merge).
    wide = builder("x", Image.new("RGB", (300, 100), (200, 30, 30)), min_pixels=512 * 512, max_pixels=768 * 768)
    _, h, w = wide["image_grid_thw"][0].tolist()
    assert 512 * 512 <= (16 * h) * (16 * w) <= 768 * 768 and w > 2.5 * h and h % 2 == w % 2 == 0


def test_fallback_matches_qwen3vl_processor_logic(tiny_vlm_dir, ball):
    """Runs here: the real Qwen3VLProcessor code, built without its torchvision-only video half."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        # Qwen3VLProcessor's own __init__ (the token attributes it sets differ between transformers
        # releases: 5.25 added vision_start/end), with no video processor: ProcessorMixin takes the
        # processor's halves from this signature, so it neither asks for nor class-checks the video one.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    tok = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    proc = ImageOnlyQwen3VLProcessor(AutoImageProcessor.from_pretrained(tiny_vlm_dir), tok,
                                     chat_template=tok.chat_template)
    text = proc.apply_chat_template(vlm_messages("a photo of sks ball"), tokenize=False, add_generation_prompt=True)
    size = {"shortest_edge": 512 * 512, "longest_edge": 768 * 768}
    expected = proc(text=[text], images=[ball], size=size, return_tensors="pt")
    got = VlmInputBuilder(tiny_vlm_dir, use_processor=False)("a photo of sks ball", ball, 512 * 512, 768 * 768)
    assert set(got) == set(expected)
    for k in got:
        assert torch.equal(got[k], expected[k]), k


def test_autoprocessor_path_equals_fallback(tiny_vlm_dir, ball):
    # The only skip in this file: AutoProcessor(Qwen3VLProcessor) needs torchvision for its video
    # processor; the CPU CI has none, so this comparison runs on machines that have it.
    pytest.importorskip("torchvision", reason="AutoProcessor for Qwen3-VL needs torchvision")
    processor = VlmInputBuilder(tiny_vlm_dir)
    assert processor.path == "processor"
    fallback = VlmInputBuilder(tiny_vlm_dir, use_processor=False)
    got, expected = fallback("a photo of sks ball", ball), processor("a photo of sks ball", ball)
    assert set(got) == set(expected)
    for k in got:
        assert torch.equal(got[k], expected[k]), k


# ----------------------------------------------------------------------------------------------
# Features

def test_encode_vlm_zimage_layer(grafted, ball):
    model, builder = grafted
    feats = encode_vlm(model, builder, ["a photo of sks ball"], [ball])
    assert len(feats) == 1
    (f,) = feats
    hidden = model.config.text_config.hidden_size
    assert f.ndim == 2 and f.shape[1] == hidden and torch.isfinite(f).all()
    assert f.shape[0] > 256  # the 256 image tokens are in the sequence, plus the chat text
    again = encode_vlm(model, builder, ["a photo of sks ball"], [ball])[0]
    assert torch.equal(f, again)
    # The image matters: another image gives other features for the same caption.
    other = encode_vlm(model, builder, ["a photo of sks ball"], [ball.transpose(Image.FLIP_LEFT_RIGHT)])[0]
    assert f.shape == other.shape and not torch.allclose(f, other)

    cut = encode_vlm(model, builder, ["a photo of sks ball"], [ball], max_sequence_length=100)[0]
    assert torch.equal(cut, f[:100])


def test_encode_vlm_klein_layers_stack_like_the_pipeline(grafted, ball):
    model, builder = grafted
    (stacked,) = encode_vlm(model, builder, ["a photo of sks ball"], [ball], hidden_layers=(9, 18, 27))
    singles = [encode_vlm(model, builder, ["a photo of sks ball"], [ball], hidden_layers=(k,))[0] for k in (9, 18, 27)]
    d = model.config.text_config.hidden_size
    assert stacked.shape == (singles[0].shape[0], 3 * d)
    # Flux2KleinPipeline: stack(dim=1) -> permute(0, 2, 1, 3) -> reshape(B, L, 3 * D): per token, layer-major.
    torch.testing.assert_close(stacked, torch.cat(singles, dim=1), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Padding (klein: the pipeline pads every caption to max_sequence_length and keeps the pad states)

KLEIN_LAYERS = (9, 18, 27)


def test_padded_text_reproduces_the_klein_pipelines_prompt_embeds(tiny_vlm_dir, tiny_klein_dir):
    """Text only, the grafted VLM is klein's text encoder; padded, it must give what
    Flux2KleinPipeline gives the transformer: all max_sequence_length states, the pads' included."""
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    model, _ = load_grafted_vlm(tiny_vlm_dir, tiny_klein_dir / "text_encoder", "cpu", torch.float32)
    te = Qwen3ForCausalLM.from_pretrained(tiny_klein_dir / "text_encoder", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_klein_dir / "tokenizer")
    caption, length = "a photo of sks ball", 40
    text = tok.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    enc = tok(text, return_tensors="pt")
    inputs = {**enc, "mm_token_type_ids": torch.zeros_like(enc["input_ids"])}
    real = enc["input_ids"].shape[1]
    assert real < length  # there is padding to compare
    with torch.no_grad():
        expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(te, tok, caption, max_sequence_length=length,
                                                               hidden_states_layers=KLEIN_LAYERS)[0]
    got = vlm_features(model, inputs, KLEIN_LAYERS, pad_to=length, pad_token_id=tok.pad_token_id)
    assert got.shape == expected.shape == (length, 3 * te.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The comparison sees the pads' positions: at 0, where Qwen3-VL's rope index puts masked tokens
    # (so where it would put them beside an image), their states differ.
    padded = {k: torch.cat([v, v.new_full((1, length - real), tok.pad_token_id if k == "input_ids" else 0)], 1)
              for k, v in inputs.items()}
    at_zero = torch.cat([torch.arange(real), torch.zeros(length - real, dtype=torch.long)]).view(1, 1, -1)
    with torch.no_grad():
        hidden = model(**padded, position_ids=at_zero.expand(3, 1, -1), output_hidden_states=True,
                       use_cache=False).hidden_states
    wrong = torch.cat([hidden[k][0] for k in KLEIN_LAYERS], dim=1)
    torch.testing.assert_close(wrong[:real], expected[:real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wrong[real:], expected[real:], rtol=1e-3, atol=1e-3)


class _Captured(Exception):
    pass


def _pipeline_prompt_text(family_name, model_dir, caption):
    """The chat text the stock pipeline tokenizes for `caption`, caught at its tokenizer call."""
    from types import SimpleNamespace

    from diffusers import Flux2KleinPipeline, ZImagePipeline
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(model_dir / "tokenizer")

    class Spy:
        def apply_chat_template(self, *args, **kwargs):
            return real.apply_chat_template(*args, **kwargs)

        def __call__(self, text, *args, **kwargs):
            raise _Captured(text if isinstance(text, str) else text[0])

    with pytest.raises(_Captured) as caught:
        if family_name == "zimage":
            ZImagePipeline._encode_prompt(SimpleNamespace(tokenizer=Spy(), _execution_device="cpu"), caption)
        else:
            Flux2KleinPipeline._get_qwen3_prompt_embeds(None, Spy(), caption, dtype=torch.float32, device="cpu")
    return caught.value.args[0]


@pytest.mark.parametrize("family_name", ["zimage", "klein"])
def test_the_vlm_teachers_text_is_the_pipelines_caption_text_plus_the_image(tiny_vlm_dir, tiny_zimage_dir,
                                                                             tiny_klein_dir, ball, family_name):
    """Student and vlm teacher differ by the image alone: the teacher's chat text, image tokens
    removed, is what the pipeline tokenizes for the caption (klein's ends in an empty think block,
    which Qwen3-VL-Instruct's template cannot render: the family supplies it)."""
    import re

    from lowvram_dopsd.families import load_family

    model_dir = tiny_zimage_dir if family_name == "zimage" else tiny_klein_dir
    caption = "a photo of sks ball"
    family = load_family(str(model_dir))
    builder = VlmInputBuilder(tiny_vlm_dir, use_processor=False, reply_prefix=family.vlm_reply_prefix())
    teacher = builder.tokenizer.decode(builder(caption, ball)["input_ids"][0])
    without_image = re.sub(r"<\|vision_start\|>(<\|image_pad\|>)+<\|vision_end\|>", "", teacher)
    assert without_image == _pipeline_prompt_text(family_name, model_dir, caption)


def test_padding_keeps_the_real_tokens_and_the_length_limits(grafted, ball):
    model, builder = grafted
    pad_id = builder.processor.tokenizer.pad_token_id if builder.processor else builder.tokenizer.pad_token_id
    (plain,) = encode_vlm(model, builder, ["a photo of sks ball"], [ball], hidden_layers=KLEIN_LAYERS)
    n = plain.shape[0]
    (padded,) = encode_vlm(model, builder, ["a photo of sks ball"], [ball], hidden_layers=KLEIN_LAYERS,
                           pad_to=n + 12, pad_token_id=pad_id)
    assert padded.shape == (n + 12, plain.shape[1])
    torch.testing.assert_close(padded[:n], plain, rtol=1e-5, atol=1e-5)  # causal: pads change no real token
    assert torch.isfinite(padded[n:]).all() and not torch.allclose(padded[n], padded[n + 1])
    # already as long as pad_to: unchanged; the condition never exceeds max_sequence_length
    (same,) = encode_vlm(model, builder, ["a photo of sks ball"], [ball], hidden_layers=KLEIN_LAYERS,
                         pad_to=n, pad_token_id=pad_id)
    assert torch.equal(same, plain)
    (capped,) = encode_vlm(model, builder, ["a photo of sks ball"], [ball], hidden_layers=KLEIN_LAYERS,
                           max_sequence_length=n + 5, pad_to=n + 12, pad_token_id=pad_id)
    torch.testing.assert_close(capped, padded[:n + 5], rtol=1e-5, atol=1e-5)


def test_the_vlm_teacher_reads_the_training_crop_and_its_key_changes_with_it(tmp_path, tiny_vlm_dir,
                                                                              tiny_zimage_dir, monkeypatch):
    """The teacher sees what the student learns to draw: the item's bucketed, centre-cropped image (as
    the authors' teacher does), not the uncropped photo; the crop depends on `resolution`, so the
    teacher's cache key does too (features cached from the uncropped photo are not reused)."""
    import numpy as np

    from lowvram_dopsd import teacher_vlm
    from lowvram_dopsd.config import load_config
    from lowvram_dopsd.data import load_rgb, scan, training_crop
    from lowvram_dopsd.families import load_family

    wide = np.random.default_rng(0).integers(0, 255, (48, 160, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    seen = []

    def recording(model, builder, captions, images, **kw):
        seen.extend(images)
        return [torch.zeros(4, 8) for _ in captions]

    monkeypatch.setattr(teacher_vlm, "encode_vlm", recording)
    family = load_family(str(tiny_zimage_dir))
    cfg = {"model": str(tiny_zimage_dir), "images": str(tmp_path), "teacher_encoder": str(tiny_vlm_dir)}
    cfg64 = load_config("cpu-demo", {**cfg, "resolution": "64"})
    cfg128 = load_config("cpu-demo", {**cfg, "resolution": "128"})
    (item,) = scan(str(tmp_path), "", "sks", 64).items
    family.encode_teacher([item], "vlm", cfg64, torch.device("cpu"))
    (image,) = seen
    assert image.size == (item.width, item.height) != (160, 48)
    assert np.array_equal(np.asarray(image),
                          np.asarray(training_crop(load_rgb(item.image_path), item.width, item.height)))
    squashed = load_rgb(item.image_path).resize((item.width, item.height), Image.Resampling.LANCZOS)
    assert not np.array_equal(np.asarray(image), np.asarray(squashed))  # cropped to the bucket, not squashed
    assert family.encoder_identity("vlm", cfg64) != family.encoder_identity("vlm", cfg128)
    assert family.encoder_identity("student", cfg64) == family.encoder_identity("student", cfg128)
