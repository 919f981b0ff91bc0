"""Tiny model folders in the exact Hugging Face layouts of the real checkpoints, built locally.

No machine here can download weights, yet the trainer must be tested through the very code that
loads real checkpoints (`ZImagePipeline.from_pretrained`, `Flux2KleinPipeline.from_pretrained`,
`Qwen3VLForConditionalGeneration.from_pretrained`). So this module writes folders with the real
file layout and the real classes, only with tiny widths and random weights:

    make_tiny_zimage(root)        Tongyi-MAI/Z-Image-Turbo layout   (ZImagePipeline)
    make_tiny_klein(root)         black-forest-labs/FLUX.2-klein-4B (Flux2KleinPipeline); size="9b":
                                  FLUX.2-klein-9B (Qwen3-8B text encoder)
    make_tiny_flux3(root)         FLUX.3 Image Klein distilled (Flux3DistilledModularPipeline), its
                                  own Qwen3-VL text encoder
    make_tiny_qwen3vl(root, te)   Qwen/Qwen3-VL-4B-Instruct, its language model shaped like the
                                  text encoder `te` so the D-OPSD graft (paper App. D) applies
    make_tiny_dino(root)          facebook/dinov3-vits16plus-pretrain-lvd1689m (eval's DINO)
    make_tiny_clip(root)          laion/CLIP-ViT-H-14-laion2B-s32B-b79K (eval's CLIP)
    make_demo_assets(out_dir)     the bundled toy data set (a striped "sks ball", 64x64 PNG + .txt)

Every folder loads in the stock pipelines and generates a 64x64 image on the CPU in about a
second. What is kept from the real configs (so that shapes and conventions match the real models):
the VAE down-sampling factor 8, latent channels (16 Z-Image / 32 klein), the VAE scaling/shift and
batch-norm conventions, both scheduler configs, patch sizes, the Qwen special tokens and chat
template behaviour, the text encoder's 36 layers (klein reads hidden layers 9, 18, 27), and the
Qwen3-VL patch 16 / merge 2 / temporal patch 2 vision geometry. What is shrunk: every width.

Folders are deterministic in `seed`. The tokenizer is a byte-level BPE trained here on a built-in
caption corpus and wrapped as `Qwen2Tokenizer`, the class the real Qwen3 checkpoints use.
"""
from __future__ import annotations

import json
import math
import random
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Tokenizer

# The real Qwen2/Qwen3 vocabulary ends with these added tokens, in this order (ids 151643..151668).
# (token, special): `<tool_call>`, `<tool_response>` and `<think>` pairs are added but not special.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True), ("<|repo_name|>", True), ("<|file_sep|>", True),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)

# Qwen's pre-tokenizer split (the regex the real tokenizer.json carries).
_QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# A Qwen3-style chat template. Strings and multimodal content lists are both accepted (the VLM
# message is `[{"type": "image"}, {"type": "text", "text": ...}]`). With `think_switch`, as in
# Qwen3's own template, `enable_thinking=False` appends an empty think block to the generation
# prompt, and `enable_thinking=True` (what ZImagePipeline passes) or undefined appends nothing.
# Qwen3-VL-Instruct's template has no think switch and no default system prompt.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if THINK_SWITCH and enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def chat_template(think_switch: bool = True) -> str:
    return _CHAT_TEMPLATE.replace("THINK_SWITCH", "true" if think_switch else "false")


def _caption_corpus() -> list[str]:
    """A few hundred English caption-like lines, deterministic; enough for ~1k BPE merges."""
    subjects = ["dog", "cat", "ball", "car", "house", "tree", "woman", "man", "child", "bird", "flower",
                "robot", "bottle", "chair", "mountain", "river", "city street", "bicycle", "horse", "cup"]
    colours = ["red", "white", "blue", "green", "yellow", "black", "striped", "golden", "small", "large"]
    places = ["on the grass", "on the beach", "in the snow", "on a wooden floor", "under a blue sky",
              "at night", "in a forest", "on a table", "in front of a window", "near the sea"]
    styles = ["a photo of", "a painting of", "a drawing of", "a close-up photo of", "an illustration of",
              "a picture of"]
    rng = random.Random(1234)
    lines = []
    for i in range(600):
        lines.append(f"{rng.choice(styles)} a {rng.choice(colours)} {rng.choice(subjects)} {rng.choice(places)}")
    lines += [
        "The quick brown fox jumps over the lazy dog.",
        "sks ball, a red and white striped toy ball, photographed in soft light.",
        "You are a helpful assistant. Describe the image in detail, then answer the question.",
        "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1024, punctuation: commas, periods; quotes \"like this\"!",
    ]
    return lines


@lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int) -> str:
    """The BPE model (vocab + merges) as JSON text; trained once per process (~0.5 s)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_caption_corpus(), trainer)
    return json.dumps(json.loads(bpe.to_str())["model"])


def build_tiny_tokenizer(vocab_size: int = 1024):
    """Byte-level BPE trained on the built-in corpus, wrapped as the real Qwen tokenizer class.

    Returns a `transformers.Qwen2Tokenizer` (transformers 5 aliases `Qwen2TokenizerFast` to it)
    with the Qwen added tokens, pad `<|endoftext|>`, eos `<|im_end|>` (as Qwen3-4B) and the
    Qwen3-style chat template. The corpus supports ~540 merges+bytes, so `vocab_size` is an upper
    bound: the result has ~570 tokens. Deterministic: BPE training on a fixed corpus is.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    model = json.loads(_trained_bpe(vocab_size))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]

    # Built with eos = pad = <|endoftext|> so that it is the first added token, as in Qwen; the
    # rest follow in the real order, then eos becomes <|im_end|> (as in Qwen3-4B's config).
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=131072)
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED_TOKENS])
    tok.eos_token = "<|im_end|>"
    tok.padding_side = "right"
    tok.chat_template = chat_template(think_switch=True)
    return tok


def _padded_vocab(tokenizer) -> int:
    """Embedding rows: the tokenizer length rounded up to 64 (Qwen pads 151669 -> 151936 too)."""
    return 64 * math.ceil(len(tokenizer) / 64)


# ----------------------------------------------------------------------------------------------
# Shared pieces

# Tiny Qwen3-4B: the real one is hidden 2560, 36 layers, 32 heads, 8 kv heads, head_dim 128,
# intermediate 9728, rope theta 1e6, tied embeddings. Keep 36 layers (klein stacks 9, 18, 27).
TEXT_ENCODER_DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=36,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
# Tiny Qwen3-8B (klein 9B's text encoder): the real one is hidden 4096, 36 layers, 32 heads, 8 kv
# heads, head_dim 128, intermediate 12288, and, unlike Qwen3-4B, an lm_head of its own (untied).
# Wider than the tiny 4B's, so a VLM shaped for one cannot be grafted with the other.
TEXT_ENCODER_9B_DIMS = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=36,
                            num_attention_heads=3, num_key_value_heads=1, head_dim=16)


@contextmanager
def _seeded(seed: int):
    """The global torch RNG seeded for one model's init (inits draw from it), restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _fill_zero_params(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Replace all-zero parameters (zero-init output layers, adaLN gates) with small noise.

    A zero-initialised final layer would make the tiny transformer output exactly 0 everywhere:
    tests of LoRA parity, gradients and losses against such a model could not fail.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _save_text_encoder(folder: Path, tokenizer, seed: int, dims: dict = TEXT_ENCODER_DIMS,
                       tied: bool = True) -> None:
    """A tiny Qwen3-4B (or, with the 9B's dims and `tied=False`, Qwen3-8B) saved as `Qwen3ForCausalLM`
    (as the real checkpoints: keys `model.*`, plus `lm_head.weight` when untied)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=_padded_vocab(tokenizer), max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=tied,
        bos_token_id=bos, eos_token_id=eos, max_window_layers=dims["num_hidden_layers"], **dims,
    )
    with _seeded(seed):
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)


def _vae_dims() -> dict:
    # Real: block_out_channels (128, 256, 512, 512), layers_per_block 2, 32 groups. Keeping four
    # blocks keeps the down-sampling factor 8 that the pipelines derive from len(block_out_channels).
    return dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                in_channels=3, out_channels=3, sample_size=1024, mid_block_add_attention=True)


def _folder(root) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the tiny-model factory writes into an empty folder")
    return root


# ----------------------------------------------------------------------------------------------
# Metric models of `eval` (metrics.py)

def make_tiny_dino(root, seed: int = 0) -> Path:
    """A tiny facebook/dinov3-vits16plus-pretrain-lvd1689m folder (`DINOv3ViTModel`): the real one is hidden
    384, 12 layers, 6 heads, gated MLP, 4 register tokens, patch 16, ImageNet mean/std. Kept: patch, registers,
    gated MLP, the preprocessor config; shrunk: widths and depth."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    root = _folder(root)
    config = DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_register_tokens=4, use_gated_mlp=True, patch_size=16, layerscale_value=1.0)
    with _seeded(seed):
        DINOv3ViTModel(config).save_pretrained(root)
    _write_json(root / "preprocessor_config.json", {
        "image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "size": {"height": 224, "width": 224},
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "do_rescale": True, "rescale_factor": 1 / 255})
    return root


def make_tiny_clip(root, seed: int = 0) -> Path:
    """A tiny laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder (`CLIPModel` + `CLIPProcessor`): the real one is
    ViT-H/14 at 224 px, text width 1024, projection 1024, 77 tokens, vocabulary 49408. Kept: the 77-token
    context, the processor's resize / centre crop / OpenAI mean and std, the tokenizer class and its special
    tokens; shrunk: widths, depth, the image side (32 px) and the vocabulary (single bytes, no merges)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = _folder(root)
    chars = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                         pad_token_id=vocab["<|endoftext|>"], **dims),
                        vision_config=dict(image_size=32, patch_size=8, **dims), projection_dim=16)
    with _seeded(seed):
        CLIPModel(config).save_pretrained(root)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root)
    return root


# ----------------------------------------------------------------------------------------------
# Z-Image-Turbo

def make_tiny_zimage(root, seed: int = 0) -> Path:
    """Write a tiny Tongyi-MAI/Z-Image-Turbo folder at `root`; returns `root`.

    model_index names the real classes: text encoder `Qwen3Model` (the folder holds a
    `Qwen3ForCausalLM` checkpoint, as the real one does), tokenizer `Qwen2Tokenizer`.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    root = _folder(root)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    _save_text_encoder(root / "text_encoder", tokenizer, seed=seed + 1)

    # Real: dim 3840, 30 layers, 2 refiner layers, 30 heads, head_dim 128 = sum(axes_dims 32+48+48).
    with _seeded(seed + 2):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
            cap_feat_dim=TEXT_ENCODER_DIMS["hidden_size"], rope_theta=256.0, t_scale=1000.0,
            axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512],
        )
    _fill_zero_params(transformer, seed + 2)
    transformer.save_pretrained(root / "transformer")

    with _seeded(seed + 3):
        vae = AutoencoderKL(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                            use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                            **_vae_dims())
    vae.save_pretrained(root / "vae")

    # The Turbo scheduler config as shipped: static shift 3, no dynamic shifting.
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
                                    ).save_pretrained(root / "scheduler")

    _write_json(root / "model_index.json", {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": "0.36.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    return root


# ----------------------------------------------------------------------------------------------
# FLUX.2-klein

# klein's scheduler: dynamic shifting, which Flux2KleinPipeline needs (it passes `mu` =
# compute_empirical_mu(image tokens, steps) to set_timesteps). Also written by bench_memory.py.
KLEIN_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
                       time_shift_type="exponential")


def _save_flux2_vae(folder: Path, seed: int) -> None:
    """A tiny AutoencoderKLFlux2 (FLUX.2's VAE, also FLUX.3's): 32 latent channels, 2x2 patch, BN stats."""
    from diffusers import AutoencoderKLFlux2

    with _seeded(seed):
        vae = AutoencoderKLFlux2(latent_channels=32, use_quant_conv=True, use_post_quant_conv=True,
                                 batch_norm_eps=1e-4, batch_norm_momentum=0.1, patch_size=(2, 2),
                                 **_vae_dims())
        # Running statistics that are not the identity, so the pipeline's latent (de)normalisation
        # is actually exercised (the real VAE ships fitted statistics).
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    vae.save_pretrained(folder)


def make_tiny_klein(root, seed: int = 0, size: str = "4b") -> Path:
    """Write a tiny black-forest-labs/FLUX.2-klein-4B folder at `root` (`size="9b"`: FLUX.2-klein-9B);
    returns `root`.

    The pipeline's text condition stacks Qwen3 hidden states 9, 18, 27 (`text_encoder_out_layers`
    is a call argument, default (9, 18, 27)); the tiny text encoder keeps the real 36 layers, so
    the default works, and `joint_attention_dim` = 3 x hidden size as in the real 7680 = 3 x 2560
    (4B) and 12288 = 3 x 4096 (9B). The 9B's folder differs in what the trainer can tell apart: a
    wider, untied text encoder (Qwen3-8B) and more blocks; the files and classes are the same.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    if size not in ("4b", "9b"):
        raise ValueError(f"size must be '4b' or '9b', got {size!r}")
    te_dims = TEXT_ENCODER_DIMS if size == "4b" else TEXT_ENCODER_9B_DIMS
    root = _folder(root)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    _save_text_encoder(root / "text_encoder", tokenizer, seed=seed + 11, dims=te_dims, tied=size == "4b")

    # Real 4B: 5 double + 20 single blocks, 24 heads x 128; 9B: 8 double + 24 single, 32 heads x 128.
    # Both: rope axes (32, 32, 32, 32), in_channels 128 = 32 latent channels x 2x2 patch, no guidance
    # embedding (distilled).
    blocks = dict(num_layers=1, num_single_layers=2) if size == "4b" else dict(num_layers=2, num_single_layers=2)
    with _seeded(seed + 12):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=128, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=3 * te_dims["hidden_size"], timestep_guidance_channels=256, mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False, **blocks,
        )
    _fill_zero_params(transformer, seed + 12)
    transformer.save_pretrained(root / "transformer")

    _save_flux2_vae(root / "vae", seed + 13)
    FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER).save_pretrained(root / "scheduler")

    _write_json(root / "model_index.json", {
        "_class_name": "Flux2KleinPipeline",
        "_diffusers_version": "0.37.0.dev0",
        "is_distilled": True,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    })
    return root


# ----------------------------------------------------------------------------------------------
# Qwen3-VL teacher

# Real Qwen3-VL-4B-Instruct image preprocessing: pixels between 256^2 and 4096^2, mean/std 0.5.
_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
_VIDEO_PREPROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}


def _qwen3vl_tokenizer():
    """The tiny tokenizer with Qwen3-VL-Instruct's chat template (no think switch), and the ids of the
    vision placeholder tokens the model config names."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = chat_template(think_switch=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    return tokenizer, ids


def _save_qwen3vl(folder: Path, tokenizer, ids: dict, text: dict, tied: bool, seed: int) -> None:
    """A tiny Qwen3VLForConditionalGeneration with language model dims `text` (hidden_size,
    intermediate_size, num_hidden_layers, heads, head_dim, rope_theta, bos/eos ids), its processor
    files beside it (preprocessor, video preprocessor, chat template), as Qwen/Qwen3-VL-*-Instruct."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = text["head_dim"]
    # Real mrope_section [24, 20, 20] splits the 64 rotary frequencies of head_dim 128 between the
    # t/h/w axes; same proportions here.
    half = head_dim // 2
    section = [half - 2 * (half * 20 // 64), half * 20 // 64, half * 20 // 64]
    text_config = dict(
        vocab_size=_padded_vocab(tokenizer), hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"], num_key_value_heads=text["num_key_value_heads"],
        head_dim=head_dim, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=262144,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": text["rope_theta"],
                         "mrope_section": section, "mrope_interleaved": True},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=tied,
    )
    # Real vision: depth 24, hidden 1024, 16 heads, intermediate 4096, deepstack layers (5, 11, 17).
    vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                         patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                         out_hidden_size=text["hidden_size"], num_position_embeddings=2304,
                         deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
    config = Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=tied,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    with _seeded(seed):
        model = Qwen3VLForConditionalGeneration(config)
    _fill_zero_params(model, seed)
    model.save_pretrained(folder)


def _save_qwen3vl_processor(folder: Path, tokenizer) -> None:
    """The files AutoProcessor reads for a Qwen3VLProcessor: tokenizer, image and video preprocessor
    configs, chat template."""
    tokenizer.save_pretrained(folder)
    _write_json(folder / "preprocessor_config.json", _PREPROCESSOR)
    _write_json(folder / "video_preprocessor_config.json", _VIDEO_PREPROCESSOR)
    _write_json(folder / "chat_template.json", {"chat_template": tokenizer.chat_template})


def make_tiny_qwen3vl(root, text_encoder_dir, seed: int = 0) -> Path:
    """Write a tiny Qwen/Qwen3-VL-4B-Instruct folder at `root` whose language model has the dims of
    the Qwen3 text encoder in `text_encoder_dir` (so its weights can be grafted in); returns `root`.
    For klein 9B's Qwen3-8B it is the matching Qwen3-VL-8B-Instruct (untied lm_head, as both are).

    Its own weights are different random ones. The vision tower keeps the real geometry
    (patch 16, temporal patch 2, merge 2, learned 48x48 position grid) at tiny width and depth;
    `out_hidden_size` = LM hidden size. Token ids in the config are read from the tokenizer.
    """
    from transformers import AutoConfig

    root = _folder(root)
    te = AutoConfig.from_pretrained(text_encoder_dir)
    tokenizer, ids = _qwen3vl_tokenizer()
    # Rope theta is the text encoder's: the real Qwen3-VL-4B uses 5e6 where Qwen3-4B uses 1e6, and
    # the graft does not touch the config; the tiny pair is kept equal so that a text-only prompt
    # through the grafted VLM reproduces the text encoder.
    text = {k: getattr(te, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "head_dim")}
    text["rope_theta"] = te.rope_parameters["rope_theta"]
    _save_qwen3vl(root, tokenizer, ids, text, te.tie_word_embeddings, seed + 21)
    _save_qwen3vl_processor(root, tokenizer)
    return root


# ----------------------------------------------------------------------------------------------
# FLUX.3 Image Klein (distilled)

# The modular pipeline's components as its repo lists them (`modular_model_index.json`, the file
# `ModularPipeline.save_pretrained` writes: [library, class, loading spec]); the scheduler and the
# image processor are made from the blocks' own configs (`default_creation_method="from_config"`),
# so the folder has no scheduler/. The layout of the published repo could not be read from here;
# this is what diffusers 0.42.1 writes and reads for this pipeline class.
FLUX3_COMPONENTS = {
    "text_encoder": ("transformers", "Qwen3VLForConditionalGeneration"),
    "tokenizer": ("transformers", "Qwen3VLProcessor"),
    "transformer": ("diffusers", "Flux3Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKLFlux2"),
}

# Tiny Qwen3-VL-4B as FLUX.3's own text encoder: the real language model is hidden 2560, 36 layers,
# 32 heads, 8 kv heads, head_dim 128, rope theta 5e6; the pipeline stacks layers 4, 8, ..., 32.
FLUX3_TEXT_DIMS = dict(TEXT_ENCODER_DIMS, rope_theta=5_000_000.0)


def make_tiny_flux3(root, seed: int = 0) -> Path:
    """Write a tiny FLUX.3 Image Klein (distilled) folder at `root` for `Flux3DistilledModularPipeline`;
    returns `root`.

    Kept from the real model (diffusers' Flux3Transformer2DModel defaults and the pipeline's blocks):
    the flow-map transformer (`flow_map=True`, a target-timestep embedder), 128 = 32 x 2x2 latent
    channels for image and reference tokens, 4 rope axes, `joint_attention_dim` = 8 stacked text
    layers x the encoder's hidden size (real 20480 = 8 x 2560), the 36-layer Qwen3-VL encoder with its
    vision tower, FLUX.2's VAE. Shrunk: every width and the block counts (real 5 per-mode + 28 joint).
    """
    from diffusers import Flux3Transformer2DModel

    root = _folder(root)
    tokenizer, ids = _qwen3vl_tokenizer()
    _save_qwen3vl_processor(root / "tokenizer", tokenizer)
    _save_qwen3vl(root / "text_encoder", tokenizer, ids, FLUX3_TEXT_DIMS, tied=True, seed=seed + 31)

    with _seeded(seed + 32):
        transformer = Flux3Transformer2DModel(
            in_channels=128, cond_in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=8 * FLUX3_TEXT_DIMS["hidden_size"], timestep_channels=256,
            mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=10000, eps=1e-6, flow_map=True,
        )
    _fill_zero_params(transformer, seed + 32)
    transformer.save_pretrained(root / "transformer")
    _save_flux2_vae(root / "vae", seed + 33)

    index = {"_class_name": "Flux3DistilledModularPipeline", "_diffusers_version": "0.42.1",
             "_blocks_class_name": "Flux3DistilledAutoBlocks"}
    for name, (library, cls) in FLUX3_COMPONENTS.items():
        index[name] = [library, cls, {"pretrained_model_name_or_path": None, "subfolder": name, "variant": None,
                                      "revision": None, "type_hint": [library, cls]}]
    _write_json(root / "modular_model_index.json", index)
    return root


# ----------------------------------------------------------------------------------------------
# Demo data: a toy subject ("sks ball", red-and-white stripes) on varied backgrounds

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
DEMO_SCENES: tuple[tuple[str, str], ...] = (
    ("grass", "a photo of sks ball on grass"),
    ("sand", "a photo of sks ball on the beach"),
    ("sky", "a photo of sks ball under a blue sky"),
    ("wood", "a photo of sks ball on a wooden floor"),
    ("snow", "a photo of sks ball in the snow"),
    ("night", "a photo of sks ball at night"),
)


def _background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    if kind == "grass":
        base, var = np.array([60, 140, 50]), np.stack([noise * 18, noise * 30, noise * 10], -1)
        img = base + var + (y[..., None] * np.array([-20, 30, -10]))
    elif kind == "sand":
        img = np.array([222, 196, 140]) + noise[..., None] * 8 + np.sin(x * 25 + y * 6)[..., None] * 6
    elif kind == "sky":
        img = np.stack([90 + 80 * y, 150 + 60 * y, 235 + 0 * y], -1) + noise[..., None] * 3
    elif kind == "wood":
        plank = np.floor(y * 5)                                  # 5 horizontal boards
        tone = (plank * 0.37 % 1.0)[..., None] * 30 - 15           # each board its own shade
        grain = np.sin(x * 40 + plank * 2.1 + np.sin(y * 30) * 1.5)[..., None] * 10
        seam = ((y * 5) % 1.0 < 0.06)[..., None] * -60
        img = np.array([160, 108, 62]) + tone + grain + seam + noise[..., None] * 4
    elif kind == "snow":
        img = np.array([236, 240, 248]) - (y[..., None] * 25) + noise[..., None] * 6
    elif kind == "night":
        img = np.stack([15 + 20 * y, 18 + 20 * y, 45 + 30 * y], -1) + noise[..., None] * 3
        stars = rng.random((size, size)) > 0.985
        img[stars] = 230
    else:
        raise ValueError(f"unknown background {kind!r}")
    return img


def draw_demo_image(kind: str, index: int = 0, size: int = 64) -> Image.Image:
    """One demo picture: the striped ball on background `kind`, position/size varied by `index`."""
    rng = np.random.default_rng(1000 + index)
    img = _background(kind, rng, size)
    cx = size * (0.42 + 0.16 * rng.random())
    cy = size * (0.45 + 0.15 * rng.random())
    r = size * (0.22 + 0.08 * rng.random())
    angle = rng.random() * math.pi
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = (x - cx) / r, (y - cy) / r
    inside = dx * dx + dy * dy <= 1.0
    # Stripes: bands across the ball along a random direction, bent a little to look spherical.
    u = dx * math.cos(angle) + dy * math.sin(angle)
    bands = np.floor((np.arcsin(np.clip(u, -1, 1)) / math.pi + 0.5) * 6) % 2
    ball = np.where(bands[..., None] > 0, np.array([225, 30, 35]), np.array([245, 245, 245]))
    # Lambert-ish shading from the upper left and a soft shadow below the ball.
    dz = np.sqrt(np.clip(1 - dx * dx - dy * dy, 0, 1))
    light = np.clip(0.35 + 0.65 * (-0.5 * dx - 0.6 * dy + 0.62 * dz), 0.2, 1.0)
    shadow = np.exp(-(((x - cx - 0.3 * r) / (1.2 * r)) ** 2 + ((y - cy - 1.0 * r) / (0.35 * r)) ** 2))
    img = img * (1 - 0.45 * shadow[..., None])
    img = np.where(inside[..., None], ball * light[..., None], img)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_demo_assets(out_dir=DEMO_DIR) -> list[Path]:
    """Write the demo set (PNG + same-stem .txt caption per scene); returns the image paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (kind, caption) in enumerate(DEMO_SCENES):
        path = out_dir / f"{i:02d}_{kind}.png"
        draw_demo_image(kind, i).save(path, optimize=True)
        path.with_suffix(".txt").write_text(caption + "\n")
        paths.append(path)
    return paths
