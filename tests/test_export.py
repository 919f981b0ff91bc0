"""ComfyUI export: the key names ComfyUI's loader maps, .alpha tensors, exact round trips, and diffusers'
own converters reading the export back to the same LoRA (and, for Z-Image, the same images).

The expected names are written out here from ComfyUI's loader, independently of lowvram_dopsd/families/comfy.py:
- Z-Image (comfy/lora.py, Lumina2 branch, via comfy/utils.py z_image_to_diffusers): `diffusion_model.` +
  the diffusers module name, for to_q/to_k/to_v (slices of the fused attention.qkv), to_out.0
  (attention.out) and feed_forward.w1/w2/w3 of layers.N, context_refiner.N and noise_refiner.N.
- FLUX.2 (comfy/lora.py generic loop): `lora_unet_` + the native module name with "_" for ".":
  double_blocks.N.{img,txt}_attn.{qkv,proj}, double_blocks.N.{img,txt}_mlp.{0,2},
  single_blocks.N.linear1/linear2 (names per comfy/utils.py flux_to_diffusers).
"""
import json
import re
import shutil

import pytest
import torch
from diffusers import ZImagePipeline
from diffusers.loaders.lora_conversion_utils import (_convert_kohya_flux2_lora_to_diffusers,
                                                     _convert_non_diffusers_z_image_lora_to_diffusers)
from safetensors import safe_open
from safetensors.torch import load_file
from trust_helpers import random_lora

from lowvram_dopsd import export
from lowvram_dopsd.families import comfy as layouts
from lowvram_dopsd.cli import main
from lowvram_dopsd.lora import DualLoRA

COMFY_ZIMAGE = re.compile(r"^diffusion_model\.(layers|context_refiner|noise_refiner)\.\d+\."
                          r"(attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123])"
                          r"\.(lora_A\.weight|lora_B\.weight|alpha)$")
COMFY_FLUX2 = re.compile(r"^lora_unet_(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2)"
                         r"|single_blocks_\d+_linear[12])\.(lora_down\.weight|lora_up\.weight|alpha)$")


def products(pairs, scale=1.0):
    return {m: scale * (b.float() @ a.float()) for m, (a, b) in pairs.items()}


def assert_same_products(got, want):
    assert set(got) == set(want)
    for m in want:
        assert torch.allclose(got[m], want[m], rtol=1e-5, atol=1e-6), m


def test_zimage_export_matches_comfyui_layout_and_loads_back_in_diffusers(tmp_path, tiny_zimage_dir, capsys):
    out = tmp_path / "myrun"
    _, _, _, lora, path = random_lora(tiny_zimage_dir, out, rank=4, alpha=8.0)
    assert main(["export", "--format", "comfyui", str(out)]) == 0
    exported = out / "comfyui" / "myrun.safetensors"
    assert str(exported) in capsys.readouterr().out
    comfy = load_file(str(exported))

    # 1. every key is one ComfyUI maps for Z-Image, every layer has its alpha
    assert all(COMFY_ZIMAGE.match(k) for k in comfy), [k for k in comfy if not COMFY_ZIMAGE.match(k)][:3]
    modules = sorted(lora.layers)
    assert sorted(k[len("diffusion_model."):-len(".alpha")] for k in comfy if k.endswith(".alpha")) == modules
    assert {float(v) for k, v in comfy.items() if k.endswith(".alpha")} == {8.0}
    with safe_open(str(exported), framework="pt") as fh:
        meta = fh.metadata()
    assert "lora_adapter_metadata" not in meta  # diffusers would apply alpha/r twice
    assert meta["ss_network_dim"] == "4" and json.loads(meta["lowvram_dopsd"])["family"] == "zimage"

    # 2. round trip to our layout: identical tensors
    ours = export.split_modules(load_file(str(path)))
    back, alpha = layouts.zimage_to_diffusers(comfy)
    assert alpha == 8.0 and set(back) == set(ours)
    for m in ours:
        assert torch.equal(back[m][0], ours[m][0]) and torch.equal(back[m][1], ours[m][1])

    # 3. diffusers' own converter for non-diffusers Z-Image LoRAs gives our LoRA (alpha/r baked in)
    converted = _convert_non_diffusers_z_image_lora_to_diffusers(dict(comfy))
    assert set(converted) == set(load_file(str(path)))
    assert_same_products(products(export.split_modules(converted)), products(ours, scale=8.0 / 4))

    # 4. and the stock pipeline makes the same images from either file
    pipe = ZImagePipeline.from_pretrained(tiny_zimage_dir, dtype=torch.float32)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(0))
    latents = []
    for folder, name in ((out, path.name), (exported.parent, exported.name)):
        pipe.load_lora_weights(str(folder), weight_name=name, adapter_name=name.split(".")[0])
        pipe.set_adapters([name.split(".")[0]])
        latents.append(pipe("sks ball", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                            latents=noise.clone(), output_type="latent").images)
    pipe.disable_lora()
    base = pipe("sks ball", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                latents=noise.clone(), output_type="latent").images
    assert ((latents[0] - latents[1]).norm() / latents[0].norm()) < 1e-5
    assert ((latents[0] - base).norm() / base.norm()) > 1e-3  # the LoRA does something


@pytest.mark.parametrize("model_dir", ["tiny_klein_dir", "tiny_klein9b_dir"])
def test_klein_export_fuses_qkv_exactly_and_diffusers_splits_it_back(model_dir, request):
    """The 4B and the 9B alike: ComfyUI's Flux.2 detection reads the width from img_in and counts the
    blocks (comfy/model_detection.py), so the 9B's LoRA keys map through the same generic loop."""
    from diffusers import Flux2Transformer2DModel

    from lowvram_dopsd.families.klein import Klein

    model = Flux2Transformer2DModel.from_pretrained(request.getfixturevalue(model_dir) / "transformer")
    torch.manual_seed(0)
    lora = DualLoRA.attach(model, Klein.lora_targets, rank=4, alpha=8.0)  # every layer klein trains
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.student_B.normal_(std=0.3)
    ours = export.split_modules(lora.tensors("student"), prefix="")
    assert any(".attn.to_q" in m for m in ours) and any("single_transformer_blocks" in m for m in ours)

    comfy = layouts.klein_to_comfy(ours, alpha=8.0)
    assert all(COMFY_FLUX2.match(k) for k in comfy), [k for k in comfy if not COMFY_FLUX2.match(k)][:3]
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in comfy
    assert float(comfy["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 24.0  # rank 12: scale 2 kept
    assert float(comfy["lora_unet_single_blocks_1_linear1.alpha"]) == 8.0

    back, alpha = layouts.klein_to_diffusers(comfy)  # exact inverse
    assert alpha == 8.0 and set(back) == set(ours)
    for m in ours:
        assert torch.equal(back[m][0], ours[m][0]) and torch.equal(back[m][1], ours[m][1]), m

    converted = _convert_kohya_flux2_lora_to_diffusers(dict(comfy))  # diffusers' reader of this layout
    assert_same_products(products(export.split_modules(converted)), products(ours, scale=8.0 / 4))


def test_export_of_a_checkpoint_goes_to_the_run_folder_and_survives_rotation(tmp_path, tiny_zimage_dir, capsys,
                                                                            monkeypatch):
    """The default used to be <checkpoint>/comfyui/, deleted with the checkpoint by the next rotation."""
    from lowvram_dopsd.checkpoint import _rotate

    ckpts = tmp_path / "run" / "checkpoints"
    random_lora(tiny_zimage_dir, ckpts / "step-000500")  # a checkpoint's two LoRA files
    for step in ("step-000500", "step-000600"):
        (ckpts / step).mkdir(exist_ok=True)
        (ckpts / step / "state.json").write_text("{}")  # written last by checkpoint.save: marks it complete
    monkeypatch.chdir(ckpts)  # a relative path from inside checkpoints/ (its parent is ".")
    assert main(["export", "--format", "comfyui", "step-000500"]) == 0
    assert main(["export", "--format", "comfyui", str(ckpts / "step-000500"), "--teacher"]) == 0
    student = tmp_path / "run" / "comfyui" / "step-000500.safetensors"
    teacher = tmp_path / "run" / "comfyui" / "step-000500-teacher.safetensors"
    assert str(teacher.resolve()) in capsys.readouterr().out

    _rotate(ckpts, keep=1)  # what the save of the next checkpoint does
    assert not (ckpts / "step-000500").exists()
    ours, ema = load_file(str(student)), load_file(str(teacher))
    assert all(COMFY_ZIMAGE.match(k) for k in ours) and set(ours) == set(ema)
    assert any(not torch.equal(ours[k], ema[k]) for k in ours)  # --teacher exported the teacher


def test_a_step_lora_exports_under_its_own_name(tmp_path, tiny_zimage_dir, capsys):
    """loras/step-N.safetensors files used to export to one name (the folder's, "loras"), each over the last;
    --teacher on such a file exported the student under a "-teacher" name."""
    random_lora(tiny_zimage_dir, tmp_path / "run")
    loras = tmp_path / "run" / "loras"
    loras.mkdir()
    for step in ("step-000002", "step-000004"):
        shutil.copy(tmp_path / "run" / "pytorch_lora_weights.safetensors", loras / f"{step}.safetensors")
        assert main(["export", "--format", "comfyui", str(loras / f"{step}.safetensors")]) == 0
    assert sorted(p.name for p in (loras / "comfyui").iterdir()) == ["step-000002.safetensors",
                                                                     "step-000004.safetensors"]
    capsys.readouterr()
    assert main(["export", "--format", "comfyui", str(loras / "step-000002.safetensors"), "--teacher"]) == 2
    assert "--teacher exports the teacher_ema_lora.safetensors" in capsys.readouterr().err


def test_alpha_read_back_from_fp32_alpha_tensors_is_the_alpha():
    """.alpha tensors are fp32: 0.1 reads back 0.10000000149, and --init-lora compared it with 0.1."""
    from lowvram_dopsd.families.comfy import zimage_to_comfy, zimage_to_diffusers

    a, b = torch.randn(2, 8), torch.randn(8, 2)
    _, alpha = zimage_to_diffusers(zimage_to_comfy({"layers.0.attention.to_q": (a, b)}, 0.1))
    assert alpha == 0.1


def test_export_refuses_what_it_cannot_map(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"transformer.a.lora_A.weight": torch.zeros(1, 1), "transformer.a.lora_B.weight": torch.zeros(1, 1)},
              str(tmp_path / "x.safetensors"), metadata={"lowvram_dopsd": json.dumps({"family": "sdxl"})})
    assert main(["export", "--format", "comfyui", str(tmp_path / "x.safetensors")]) == 2
    assert "zimage" in capsys.readouterr().err
    modules = {"layers.0.attention.to_q": (torch.zeros(1, 2), torch.zeros(2, 1)),
               "layers.0.adaLN_modulation.5": (torch.zeros(1, 2), torch.zeros(2, 1))}
    try:
        layouts.zimage_to_comfy(modules, 1.0)
        raise AssertionError("expected a UserError")
    except layouts.UserError as exc:
        assert "adaLN_modulation.5" in str(exc)
