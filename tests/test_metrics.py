"""eval's metric models (metrics.py): tiny DINOv3 / CLIP folders of the real classes, loaded by the real code,
checked against references we did not write (torchmetrics for CLIP-S and CLIP-IQA)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torchmetrics.functional.multimodal.clip_iqa import clip_image_quality_assessment
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from transformers import CLIPModel, CLIPProcessor, DINOv3ViTModel

from lowvram_dopsd import metrics
from lowvram_dopsd.cli import main
from lowvram_dopsd.errors import UserError

CPU = torch.device("cpu")


def noise_images(n: int, size=(64, 48), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]


def test_dino_feature_is_the_mean_of_the_patch_tokens(tiny_dino_dir):
    """The authors' DINO-D feature: the final-normed patch tokens averaged (not the class token, not the 4 register
    tokens DINOv3 puts between them), the training image resized to the generated image's size."""
    dino = metrics.Dino.open(metrics.locate(str(tiny_dino_dir), "DINO"), CPU, torch.float32)
    arrays = noise_images(2)
    ours = dino.features([Image.fromarray(a) for a in arrays], (64, 48))

    model = DINOv3ViTModel.from_pretrained(tiny_dino_dir)
    mean, std = torch.tensor(metrics.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(metrics.IMAGENET_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    tokens = model(pixel_values=x).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + (64 // 16) * (48 // 16)
    expected = F.normalize(tokens[:, 1 + 4:].mean(dim=1), dim=-1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    wrong = F.normalize(tokens.mean(dim=1), dim=-1)  # with the class and register tokens: not the same
    assert not torch.allclose(ours, wrong, atol=1e-3)
    # a training image of another size is resized to the generated one's first (bicubic)
    big = Image.fromarray(noise_images(1, size=(128, 96), seed=1)[0])
    torch.testing.assert_close(dino.features([big], (64, 48)),
                               dino.features([big.resize((64, 48), Image.Resampling.BICUBIC)], (64, 48)))
    assert metrics.cosine_distance(ours, ours) == pytest.approx([0.0, 0.0], abs=1e-6)


class TensorFeatures(CLIPModel):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns an output object whose
    pooler_output is that tensor. Only the return type is adapted."""

    def get_image_features(self, *args, **kwargs):
        return super().get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return super().get_text_features(*args, **kwargs).pooler_output


def test_clip_score_and_clip_iqa_equal_torchmetrics(tiny_clip_dir):
    clip = metrics.Clip.open(metrics.locate(str(tiny_clip_dir), "CLIP"), CPU, torch.float32)
    arrays = noise_images(3)
    texts = ["a photo of sks ball on the moon", "a red apple [on] a table", "a lighthouse"]
    image_features = clip.image_features([Image.fromarray(a) for a in arrays])
    ours = (image_features * clip.text_features(texts)).sum(dim=-1)

    model, processor = TensorFeatures.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    with torch.no_grad():
        reference, _ = _clip_score_update(tensors, texts, model, processor)  # 100 x cosine, before clipping at 0
        iqa = clip_image_quality_assessment(torch.stack(tensors).float(), data_range=1.0,  # pixels 0-255: the
                                            model_name_or_path=lambda: (model, processor),  # processor rescales
                                            prompts=tuple(metrics.IQA_PAIRS))
    torch.testing.assert_close(ours, reference / 100, atol=1e-5, rtol=1e-4)
    for name, values in clip.iqa(image_features).items():
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float32), iqa[name], atol=0, rtol=1e-3)


def test_a_long_prompt_keeps_its_end_token(tiny_clip_dir):
    """Prompts over CLIP's 77 tokens are cut by the tokenizer, which keeps the end token CLIP pools at (as
    open_clip's tokenizer does); torchmetrics cuts the ids and loses it."""
    clip = metrics.Clip.open(tiny_clip_dir, CPU, torch.float32)
    long = "a photo of a dog " * 40
    tokens = clip.processor(text=[long], truncation=True, max_length=77)["input_ids"][0]
    assert len(tokens) == 77 and tokens[-1] == clip.processor.tokenizer.eos_token_id
    assert clip.text_features([long]).shape == (1, 16)


def test_planned_memory_covers_the_weights(tiny_dino_dir, tiny_clip_dir):
    for folder, size in ((tiny_dino_dir, (1024, 1024)), (tiny_clip_dir, None)):
        weights = sum(t.numel() * 2 for t in load_file(str(folder / "model.safetensors")).values())
        planned = metrics.planned_bytes(folder, torch.bfloat16, 1, size)
        assert 1.2 * weights < planned < 1.2 * weights + 64 * 2**20
    # a 1024² image is 4096 patches + class + registers for DINO: activations grow with the side
    assert metrics.planned_bytes(tiny_dino_dir, torch.bfloat16, 1, (1024, 1024)) > \
        metrics.planned_bytes(tiny_dino_dir, torch.bfloat16, 1, (256, 256))


def test_a_metric_model_is_read_from_safetensors_only(tmp_path, tiny_clip_dir):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_clip_dir / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80pickle")
    with pytest.raises(UserError, match="weights only as pytorch_model.bin, a pickle format"):
        metrics.locate(str(folder), "CLIP model")


def test_the_wrong_kind_of_model_is_named(tiny_clip_dir, tiny_dino_dir):
    with pytest.raises(UserError, match="not a DINO vision transformer"):
        metrics.Dino.open(tiny_clip_dir, CPU, torch.float32)
    with pytest.raises(UserError, match="not a CLIP model"):
        metrics.Clip.open(tiny_dino_dir, CPU, torch.float32)


def test_an_uncached_metric_model_offline_names_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        metrics.locate("nobody/no-such-clip", "CLIP model (--clip-model)")
    assert 'hf download nobody/no-such-clip --include "*.json" --include "*.txt" --include "model.safetensors"' \
        in str(err.value)
    with pytest.raises(UserError, match="gated: accept their license"):
        metrics.locate(metrics.DINO_DEFAULT, "DINO model")


def test_the_eval_help_names_the_default_models(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for model in (metrics.DINO_DEFAULT, metrics.CLIP_DEFAULT):
        assert model in help_text.replace("- ", "-")  # argparse may wrap a line after a hyphen
