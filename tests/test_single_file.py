"""Training on a fine-tune shipped as one .safetensors file (`transformer_file`).

The tiny models' transformers are written back into the ORIGINAL key layout (ComfyUI / the model
authors' code: fused q/k/v, klein's shift/scale order) by the inverse of diffusers' converters, here.
diffusers' own `from_single_file` reading that file back to the tiny weights checks the inverse; our
frugal loader must then give exactly what `from_single_file` gives.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowvram_dopsd.errors import UserError
from lowvram_dopsd.quant import load_frugal

def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((model_dir / "transformer").glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _cat_qkv(sd: dict, out: dict, names: tuple[str, str, str], fused: str) -> None:
    out[fused] = torch.cat([sd.pop(n) for n in names])


def to_original_zimage(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers Z-Image keys -> the original (ComfyUI) layout, inverse of
    convert_z_image_transformer_checkpoint_to_diffusers."""
    sd, out = dict(sd), {}
    for k in [k for k in sd if k.endswith(".attention.to_q.weight")]:
        base = k[: -len("to_q.weight")]
        _cat_qkv(sd, out, (base + "to_q.weight", base + "to_k.weight", base + "to_v.weight"), base + "qkv.weight")
    for k, v in sd.items():
        for new, old in (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
                         (".attention.to_out.0.", ".attention.out."), (".attention.norm_k.", ".attention.k_norm."),
                         (".attention.norm_q.", ".attention.q_norm.")):
            k = k.replace(new, old)
        out[k] = v
    out = {"model.diffusion_model." + k: v for k, v in out.items()}
    out["model.diffusion_model.norm_final.weight"] = torch.ones(4)  # in the original, dropped by diffusers
    return out


KLEIN_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                "attn.to_out.0.weight": "img_attn.proj.weight", "ff.linear_in.weight": "img_mlp.0.weight",
                "ff.linear_out.weight": "img_mlp.2.weight", "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_add_out.weight": "txt_attn.proj.weight",
                "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight"}
KLEIN_SINGLE = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
                "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
KLEIN_TOP = {"x_embedder.": "img_in.", "context_embedder.": "txt_in.",
             "time_guidance_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
             "time_guidance_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
             "time_guidance_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
             "time_guidance_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
             "double_stream_modulation_img.linear.": "double_stream_modulation_img.lin.",
             "double_stream_modulation_txt.linear.": "double_stream_modulation_txt.lin.",
             "single_stream_modulation.linear.": "single_stream_modulation.lin.", "proj_out.": "final_layer.linear."}


def to_original_klein(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FLUX.2 keys -> the original (BFL) layout, inverse of convert_flux2_transformer_checkpoint_to_diffusers:
    fused q/k/v per stream, `.scale` norms, and the final modulation as (shift, scale)."""
    sd, out = dict(sd), {}
    for k in [k for k in sd if k.endswith(".attn.to_q.weight") and k.startswith("transformer_blocks.")]:
        n = k.split(".")[1]
        p = f"transformer_blocks.{n}.attn."
        _cat_qkv(sd, out, (p + "to_q.weight", p + "to_k.weight", p + "to_v.weight"), f"double_blocks.{n}.img_attn.qkv.weight")
        _cat_qkv(sd, out, (p + "add_q_proj.weight", p + "add_k_proj.weight", p + "add_v_proj.weight"),
                 f"double_blocks.{n}.txt_attn.qkv.weight")
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "transformer_blocks":
            out[f"double_blocks.{parts[1]}.{KLEIN_DOUBLE['.'.join(parts[2:])]}"] = v
        elif parts[0] == "single_transformer_blocks":
            out[f"single_blocks.{parts[1]}.{KLEIN_SINGLE['.'.join(parts[2:])]}"] = v
        elif k == "norm_out.linear.weight":
            scale, shift = v.chunk(2)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
        else:
            new = next((k.replace(a, b, 1) for a, b in KLEIN_TOP.items() if k.startswith(a)), None)
            assert new is not None, k
            out[new] = v
    return out


def _cls(family: str):
    import diffusers
    return getattr(diffusers, {"zimage": "ZImageTransformer2DModel", "klein": "Flux2Transformer2DModel"}[family])


def _model_dir(request, family: str) -> Path:
    return request.getfixturevalue({"zimage": "tiny_zimage_dir", "klein": "tiny_klein_dir"}[family])


def _original_file(model_dir: Path, family: str, out: Path) -> Path:
    sd = _state(model_dir)
    save_file((to_original_zimage if family == "zimage" else to_original_klein)(sd), str(out))
    return out


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_frugal_loader_reads_an_original_layout_file_as_diffusers_does(request, tmp_path, family):
    model_dir = _model_dir(request, family)
    path = _original_file(model_dir, family, tmp_path / "finetune.safetensors")
    cls = _cls(family)
    assert not set(load_file(str(path))) & set(_state(model_dir))  # truly another layout
    # (a) diffusers reads our original-layout file back to the tiny weights: the inverse above is right
    ref = cls.from_single_file(str(path), config=str(model_dir), subfolder="transformer", torch_dtype=torch.float32)
    ref_sd = {k: v.detach() for k, v in ref.state_dict().items()}
    _equal(ref_sd, {k: v.float() for k, v in _state(model_dir).items()})
    # (b) the frugal loader gives exactly what from_single_file gives
    ours = load_frugal(cls, model_dir / "transformer", torch.device("cpu"), torch.float32, "none", weights_file=path)
    _equal({k: v.detach() for k, v in ours.state_dict().items()}, ref_sd)


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_frugal_loader_reads_a_diffusers_layout_single_file(request, tmp_path, family):
    model_dir = _model_dir(request, family)
    sd = {k: (v * 2 if v.is_floating_point() else v) for k, v in _state(model_dir).items()}  # a "fine-tune"
    path = tmp_path / "merged.safetensors"
    save_file(sd, str(path))
    cls = _cls(family)
    ref = cls.from_single_file(str(path), config=str(model_dir), subfolder="transformer", torch_dtype=torch.float32)
    ours = load_frugal(cls, model_dir / "transformer", torch.device("cpu"), torch.float32, "none", weights_file=path)
    _equal({k: v.detach() for k, v in ours.state_dict().items()}, {k: v.detach() for k, v in ref.state_dict().items()})
    assert not torch.equal(ours.state_dict()["x_embedder.weight" if family == "klein" else "x_pad_token"],
                           _state(model_dir)["x_embedder.weight" if family == "klein" else "x_pad_token"].float())


def test_split_rows_are_read_without_the_whole_tensor(tiny_zimage_dir, tmp_path):
    """The q/k/v of an original-layout file are row slices of its fused tensor."""
    from lowvram_dopsd.quant import Rows, single_file_map

    path = _original_file(tiny_zimage_dir, "zimage", tmp_path / "f.safetensors")
    cls = _cls("zimage")
    keys = list(load_file(str(next((tiny_zimage_dir / "transformer").glob("*.safetensors")))))
    where = single_file_map(cls, path, keys)
    q, v = where["layers.0.attention.to_q.weight"], where["layers.0.attention.to_v.weight"]
    assert isinstance(q, Rows) and q[1] == "model.diffusion_model.layers.0.attention.qkv.weight"
    n = load_file(str(path))[q[1]].shape[0] // 3
    assert q[2] == ((0, n),) and v[2] == ((2 * n, 3 * n),)


def test_bad_transformer_files_are_refused(tiny_zimage_dir, tiny_klein_dir, tmp_path):
    from lowvram_dopsd.quant import check_transformer_file

    with pytest.raises(UserError, match="does not exist"):
        check_transformer_file(tmp_path / "nope.safetensors")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="pickle"):
        check_transformer_file(ckpt)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors"):
        check_transformer_file(broken)
    scaled = tmp_path / "scaled.safetensors"  # ComfyUI's scaled fp8: the weights mean nothing without the scales
    save_file({"model.diffusion_model.layers.0.attention.qkv.weight": torch.zeros(3, 2),
               "model.diffusion_model.layers.0.attention.qkv.scale_weight": torch.ones(1),
               "scaled_fp8": torch.zeros(0)}, str(scaled))
    with pytest.raises(UserError, match="scaled-FP8"):
        load_frugal(_cls("zimage"), tiny_zimage_dir / "transformer", torch.device("cpu"), torch.float32, "none",
                    weights_file=scaled)
    cls = _cls("zimage")
    # klein's tensors under Z-Image's config: nothing maps
    klein_file = _original_file(tiny_klein_dir, "klein", tmp_path / "klein.safetensors")
    with pytest.raises(UserError, match="no tensor for|key layout"):
        load_frugal(cls, tiny_zimage_dir / "transformer", torch.device("cpu"), torch.float32, "none",
                    weights_file=klein_file)
    # the right names at the wrong size (another model size): refused before load_state_dict's traceback
    sd = _state(tiny_zimage_dir)
    sd["x_pad_token"] = torch.zeros(1, sd["x_pad_token"].shape[1] + 1)
    wrong = tmp_path / "wrong.safetensors"
    save_file(sd, str(wrong))
    with pytest.raises(UserError, match="do not fit"):
        load_frugal(cls, tiny_zimage_dir / "transformer", torch.device("cpu"), torch.float32, "none", weights_file=wrong)
    sd = _state(tiny_zimage_dir)
    sd["layers.0.attention.to_q.weight"] = sd["layers.0.attention.to_q.weight"][:-1]
    save_file(sd, str(wrong))
    with pytest.raises(UserError, match="do not fit"):
        load_frugal(cls, tiny_zimage_dir / "transformer", torch.device("cpu"), torch.float32, "none", weights_file=wrong)


def test_training_on_a_transformer_file_records_it_and_resume_checks_it(tiny_zimage_dir, tiny_vlm_dir, demo_images,
                                                                        tmp_path, capsys, monkeypatch):
    """--transformer-file: the run trains on the file's weights (not transformer/'s), says so in its header
    and the LoRA's metadata; a resume with another file is refused, the same file moved is fine; a model
    folder whose transformer/ has its config only is enough."""
    import shutil

    import lowvram_dopsd.families.base as base_mod
    from lowvram_dopsd.cli import main
    from lowvram_dopsd.output import read_info

    model = tmp_path / "model"  # the official model without transformer weights: only the file has them
    shutil.copytree(tiny_zimage_dir, model)
    for f in (model / "transformer").glob("*.safetensors*"):
        f.unlink()
    sd = {k: (v * 1.5 if v.is_floating_point() else v) for k, v in _state(tiny_zimage_dir).items()}
    finetune = tmp_path / "finetune.safetensors"
    save_file(to_original_zimage(sd), str(finetune))
    loaded = []
    real = base_mod.Family.load_transformer

    def spy(self, cfg, device, dtype):
        m = real(self, cfg, device, dtype)
        loaded.append(m.x_pad_token.detach().clone())
        return m
    monkeypatch.setattr(base_mod.Family, "load_transformer", spy)

    def args(out, file, *extra):
        return ["train", "--preset", "cpu-demo", "--model", str(model), "--teacher-encoder", str(tiny_vlm_dir),
                "--images", str(demo_images), "--cache-dir", str(tmp_path / "cache"), "--output", str(out),
                "--steps", "2", "--rollout-steps", "2", "--train-states", "1", "--set", "save_every=1",
                "--set", "preview_every=0", "--transformer-file", str(file), *extra]
    out = tmp_path / "run"
    assert main(args(out, finetune, "--steps", "1")) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "(zimage), transformer finetune.safetensors" in printed  # the run header's model line
    assert torch.equal(loaded[0], sd["x_pad_token"].float())
    assert read_info(out / "pytorch_lora_weights.safetensors")["transformer_file"] == str(finetune.resolve())
    # the closing "load it" line, run as printed, builds the pipeline on the fine-tune's transformer
    line = next(part for part in printed.split(" load it: ")[1:]).split(" try it:")[0]
    scope = {}
    exec(line, scope)
    assert torch.equal(scope["pipe"].transformer.x_pad_token, sd["x_pad_token"])
    assert scope["pipe"].get_list_adapters()["transformer"]
    # another fine-tune (same names and shapes, other size on disk): refused at resume
    other = tmp_path / "other.safetensors"
    extra = to_original_zimage(sd)
    extra["model.diffusion_model.unused_extra"] = torch.zeros(7)
    save_file(extra, str(other))
    assert main(args(out, other, "--resume")) == 2
    assert "the base model" in capsys.readouterr().err
    # the same file, moved: the run continues
    moved = tmp_path / "elsewhere" / finetune.name
    moved.parent.mkdir()
    finetune.rename(moved)
    assert main(args(out, moved, "--resume")) == 0
    assert read_info(out / "pytorch_lora_weights.safetensors")["transformer_file"] == str(moved.resolve())
    # without the file the folder has no transformer weights: the usual check names it
    assert main(args(tmp_path / "run2", "") [:-2]) == 2
    assert "transformer/" in capsys.readouterr().err
    assert main(args(tmp_path / "run3", tmp_path / "model.ckpt")) == 2
    assert "does not exist" in capsys.readouterr().err
    # (e) `sample` takes the file from the LoRA's metadata and loads it with diffusers' from_single_file:
    # the same pixels as that pipeline built by hand (the model folder has no transformer weights of its own)
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    png = tmp_path / "s.png"
    assert main(["sample", "--lora", str(out), "--prompt", "sks ball", "--seed", "3", "--output", str(png)]) == 0
    image = Image.open(png)
    assert image.text["transformer_file"] == str(moved.resolve())
    transformer = _cls("zimage").from_single_file(str(moved), config=str(model), subfolder="transformer",
                                                 torch_dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(model, transformer=transformer, dtype=torch.float32)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    by_hand = pipe("sks ball", num_inference_steps=8, width=64, height=64, guidance_scale=0.0,
                   generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(by_hand), np.asarray(image.convert("RGB")))
    moved.rename(finetune)  # the file the LoRA names is gone: a clear error, or --transformer-file
    assert main(["sample", "--lora", str(out), "--prompt", "sks ball", "--output", str(png)]) == 2
    assert "--transformer-file" in capsys.readouterr().err
    assert main(["sample", "--lora", str(out), "--prompt", "sks ball", "--seed", "3", "--output",
                 str(tmp_path / "s2.png"), "--transformer-file", str(finetune)]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s2.png")), np.asarray(Image.open(png)))


def test_the_toy_family_refuses_a_transformer_file(tmp_path):
    """The toy's transformer is our own module format: no single-file loading, said before anything runs."""
    from lowvram_dopsd.families import load_family

    toy_model = Path(__file__).resolve().parent.parent / "lowvram_dopsd" / "assets" / "toy" / "model"

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(UserError, match="transformer_file is for diffusers transformers"):
        load_family(str(toy_model), transformer_file=str(path))
