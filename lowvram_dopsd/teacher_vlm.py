"""The `vlm` teacher condition of D-OPSD (paper Appendix D): a grafted Qwen3-VL.

The teacher sees the caption AND the target image. Plain Qwen3-VL-4B features drive the diffusion
model but with artefacts (its language model drifted from Qwen3-4B during VL training), so the
paper replaces the weights of Qwen3-VL-4B's language model by those of the diffusion model's own
text encoder (Qwen3-4B) and keeps the vision tower and merger (incl. DeepStack mergers) as they
are. The teacher condition is then extracted exactly like the student's (same hidden layers, real
tokens only), from a chat message holding the image and the caption.

    model, build_inputs = load_grafted_vlm(vlm_dir, pipeline_dir / "text_encoder", "cuda", torch.bfloat16)
    conds = encode_vlm(model, build_inputs, captions, pil_images)            # Z-Image: [L, D] each
    conds = encode_vlm(model, build_inputs, captions, pil_images, hidden_layers=(9, 18, 27))  # klein

Memory: the VLM is loaded once; the text encoder is streamed into it one tensor at a time from its
safetensors shards, so two full copies never coexist. Every language-model parameter must be
replaced and every text-encoder tensor used (bar `lm_head`, which has no place in the VLM's
language model), else `UserError`: a wrong pairing would silently give a meaningless teacher.

Inputs are built by `transformers.AutoProcessor` when it loads. Qwen3VLProcessor also holds a
video processor that needs torchvision; where torchvision is missing (the CPU CI here) the same
inputs are assembled from the tokenizer and the image processor, step for step as the processor
does (see `VlmInputBuilder._assemble`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import UserError

log = logging.getLogger(__name__)

# Authors' image side range for the teacher: 512..768 px (as a pixel-count band for smart_resize).
MIN_PIXELS = 512 * 512
MAX_PIXELS = 768 * 768


# ----------------------------------------------------------------------------------------------
# Graft

def _text_encoder_shards(text_encoder_dir: Path) -> list[Path]:
    index = text_encoder_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({text_encoder_dir / name for name in weight_map.values()})
    shards = sorted(text_encoder_dir.glob("*.safetensors"))
    if not shards:
        raise UserError(f"No .safetensors weights in {text_encoder_dir}: the text encoder to graft into "
                        "the VLM must be a safetensors checkpoint (the diffusion model's text_encoder/ folder).")
    return shards


def _lm_name(key: str) -> str | None:
    """Text-encoder checkpoint key -> parameter name inside the VLM's language model.

    Qwen3ForCausalLM checkpoints (Z-Image-Turbo and klein ship these) name the body `model.*`;
    a checkpoint saved from Qwen3Model has bare names. `lm_head.*` has no counterpart (None).
    """
    if key.startswith("lm_head."):
        return None
    return key.removeprefix("model.")


def _examples(items: list[str], n: int = 4) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _dims_note(text_encoder_dir: Path, model) -> str:
    """' (text encoder: hidden 2560, 36 layers; VLM language model: ...)' when both are known."""
    try:
        te = json.loads((text_encoder_dir / "config.json").read_text())
        te = f"hidden {te['hidden_size']}, {te['num_hidden_layers']} layers"
    except (OSError, KeyError, ValueError):
        return ""
    lm = model.config.text_config
    return f" (text encoder: {te}; VLM language model: hidden {lm.hidden_size}, {lm.num_hidden_layers} layers)"


def graft_language_model(model, text_encoder_dir) -> int:
    """Overwrite `model.model.language_model` with the text encoder's weights; returns the count.

    Checks names and shapes from the safetensors headers first (no tensor data read), so a
    mismatch raises before anything is modified; then copies tensor by tensor.
    """
    from safetensors import safe_open

    text_encoder_dir = Path(text_encoder_dir)
    params = dict(model.model.language_model.named_parameters())
    plan: dict[Path, list[tuple[str, str]]] = {}
    unused, mismatched, present, seen = [], [], set(), set()
    for shard in _text_encoder_shards(text_encoder_dir):
        with safe_open(shard, framework="pt", device="cpu") as f:
            for key in f.keys():
                name = _lm_name(key)
                if name is None:
                    continue
                if name not in params:
                    unused.append(key)
                    continue
                present.add(name)
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(params[name].shape):
                    mismatched.append(f"{key} {shape} vs {tuple(params[name].shape)}")
                    continue
                plan.setdefault(shard, []).append((key, name))
                seen.add(name)
    missing = sorted(set(params) - present)
    if unused or mismatched or missing:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} shapes differ (text encoder vs VLM): {_examples(mismatched)}")
        if missing:
            problems.append(f"{len(missing)} VLM language-model parameters have no text-encoder tensor: "
                            f"{_examples(missing)}")
        if unused:
            problems.append(f"{len(unused)} text-encoder tensors have no place in the VLM: {_examples(unused)}")
        raise UserError(
            f"The text encoder in {text_encoder_dir} and the language model of the teacher VLM do not match, "
            f"so the two checkpoints cannot be grafted{_dims_note(text_encoder_dir, model)}: "
            f"{'; '.join(problems)}. Use the Qwen3-VL whose language model has the size of the diffusion "
            "model's text encoder (Qwen3-VL-4B-Instruct for Qwen3-4B, Qwen3-VL-8B-Instruct for Qwen3-8B).")

    with torch.no_grad():
        for shard, keys in plan.items():
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key, name in keys:
                    params[name].copy_(f.get_tensor(key))  # casts to the VLM's dtype/device
    return len(seen)


def load_grafted_vlm(vlm_dir, text_encoder_dir, device="cpu", dtype=torch.bfloat16, reply_prefix: str = ""):
    """Load Qwen3-VL from `vlm_dir` with its language model replaced by `text_encoder_dir`.

    Returns `(model, build_inputs)`: the model in eval mode with requires_grad False, and the
    `VlmInputBuilder` for the folder. The vision tower and mergers keep their VL weights.
    """
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(vlm_dir, dtype=dtype, device_map=str(device),
                                                            use_safetensors=True)
    n = graft_language_model(model, text_encoder_dir)
    log.info("grafted %d text-encoder tensors from %s into the VLM language model", n, text_encoder_dir)
    model.eval().requires_grad_(False)
    return model, VlmInputBuilder(vlm_dir, reply_prefix=reply_prefix)


# ----------------------------------------------------------------------------------------------
# Inputs

def vlm_messages(caption: str) -> list[dict]:
    """One user turn, the image then the caption; no system prompt (as the authors' code)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": caption}]}]


def _processor_chat_template(vlm_dir: Path) -> str | None:
    """The template AutoProcessor would use: the legacy chat_template.json first, then .jinja."""
    legacy, raw = vlm_dir / "chat_template.json", vlm_dir / "chat_template.jinja"
    if legacy.is_file():
        return json.loads(legacy.read_text())["chat_template"]
    if raw.is_file():
        return raw.read_text()
    return None


class VlmInputBuilder:
    """Caption + PIL image -> the Qwen3-VL model inputs, one item (batch 1, no padding).

    `path` says which route is used: "processor" (AutoProcessor) or "fallback" (assembled here
    from the tokenizer and AutoImageProcessor, which is the image processor AutoProcessor holds).
    `reply_prefix`: text after the generation prompt, so that the teacher's text ends as the
    student's does (`Family.vlm_reply_prefix`: klein's pipeline renders Qwen3's template with
    enable_thinking=False, which closes an empty think block there; Qwen3-VL-Instruct's has no switch).
    """

    def __init__(self, vlm_dir, use_processor: bool = True, reply_prefix: str = "", config_dir=None):
        """`config_dir`: where the model's config.json is, when not beside the processor files (FLUX.3
        keeps its encoder in text_encoder/ and the processor in tokenizer/)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

        self.vlm_dir = Path(vlm_dir)
        self.reply_prefix = reply_prefix
        self.processor = None
        self.fallback_reason = "use_processor=False" if not use_processor else None
        if use_processor:
            try:
                self.processor = AutoProcessor.from_pretrained(self.vlm_dir)
            except ImportError as e:  # Qwen3VLVideoProcessor needs torchvision
                self.fallback_reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
                log.info("AutoProcessor unavailable (%s); assembling VLM inputs from tokenizer + image processor",
                         self.fallback_reason)
        if self.processor is not None:
            return
        self.tokenizer = AutoTokenizer.from_pretrained(self.vlm_dir)
        self.image_processor = AutoImageProcessor.from_pretrained(self.vlm_dir)
        self.chat_template = _processor_chat_template(self.vlm_dir) or self.tokenizer.chat_template
        # Qwen3VLProcessor's placeholder tokens; the model matches them by the ids in its config.
        config = AutoConfig.from_pretrained(config_dir or self.vlm_dir)
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(self.video_token)
        if (self.image_token_id, self.video_token_id) != (config.image_token_id, config.video_token_id):
            raise UserError(f"The tokenizer in {self.vlm_dir} maps {self.image_token}/{self.video_token} to "
                            f"{self.image_token_id}/{self.video_token_id} but the model config expects "
                            f"{config.image_token_id}/{config.video_token_id}: the folder is inconsistent.")

    @property
    def path(self) -> str:
        return "processor" if self.processor is not None else "fallback"

    def __call__(self, caption: str, image, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> dict[str, torch.Tensor]:
        messages = vlm_messages(caption)
        # smart_resize keeps the aspect ratio and puts the pixel count inside [min, max].
        size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
        if self.processor is not None:
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return dict(self.processor(text=[text + self.reply_prefix], images=[image], size=size,
                                       return_tensors="pt"))
        # Chat text with one `<|vision_start|><|image_pad|><|vision_end|>` placeholder.
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=True)
        return self._assemble(text + self.reply_prefix, image, size)

    def _assemble(self, text: str, image, size) -> dict[str, torch.Tensor]:
        """What Qwen3VLProcessor.__call__ does for one chat text and one image, written out."""
        # 1. Pixels: patches flattened to [grid_t*grid_h*grid_w, C*temporal_patch*patch*patch].
        vision = self.image_processor(images=[image], size=size, return_tensors="pt")
        # 2. Placeholder -> one pad token per merged patch: grid_t*grid_h*grid_w / merge_size^2
        #    (Qwen3VLProcessor.replace_image_token); e.g. 512x512 -> grid (1, 32, 32) -> 256 tokens.
        n_tokens = int(vision["image_grid_thw"][0].prod()) // self.image_processor.merge_size ** 2
        if text.count(self.image_token) != 1:
            raise ValueError(f"expected one {self.image_token} in the chat text, got {text!r}")
        text = text.replace(self.image_token, self.image_token * n_tokens)
        # 3. Tokenize (the processor's text kwargs: no padding, no token_type_ids).
        enc = self.tokenizer([text], return_tensors="pt", return_token_type_ids=False)
        ids = enc["input_ids"]
        # 4. Modality of each token for M-RoPE: 0 text, 1 image, 2 video (create_mm_token_type_ids).
        mm_token_type_ids = torch.zeros_like(ids)
        mm_token_type_ids[ids == self.image_token_id] = 1
        mm_token_type_ids[ids == self.video_token_id] = 2
        return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": mm_token_type_ids,
                "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}


# ----------------------------------------------------------------------------------------------
# Features

@torch.inference_mode()
def encode_vlm(model, inputs_builder: VlmInputBuilder, captions: Sequence[str], images: Sequence,
               hidden_layers: Sequence[int] = (-2,), max_sequence_length: int = 1024,
               min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, pad_to: int = 0,
               pad_token_id: int | None = None) -> list[torch.Tensor]:
    """Teacher conditions, one per (caption, image), on the CPU in the model's dtype (`vlm_features`)."""
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions but {len(images)} images")
    return [vlm_features(model, inputs_builder(caption, image, min_pixels, max_pixels), hidden_layers,
                         max_sequence_length, pad_to, pad_token_id)
            for caption, image in zip(captions, images)]


@torch.inference_mode()
def vlm_features(model, inputs: dict[str, torch.Tensor], hidden_layers: Sequence[int] = (-2,),
                 max_sequence_length: int = 1024, pad_to: int = 0, pad_token_id: int | None = None) -> torch.Tensor:
    """One item's condition from its model inputs (batch 1, no padding, as VlmInputBuilder gives).

    `hidden_layers=(-2,)` (Z-Image): `hidden_states[-2]` of the real tokens, [L, D].
    Several layers (klein: (9, 18, 27)): stacked per token as Flux2KleinPipeline's
    `_get_qwen3_prompt_embeds` does, [L, len(layers) * D] (layer-major within each token).
    L counts every real token, image pad tokens included, cut to `max_sequence_length`; cutting
    the output equals cutting the input because the language model is causal.

    `pad_to` (klein): a sequence shorter than this is right-padded to it with `pad_token_id`, as
    Flux2KleinPipeline pads every caption to max_sequence_length (`padding="max_length"`), and the
    pad tokens' states are part of the condition, because the pipeline hands the transformer all
    512 of them, without a mask. See `_append_padding`.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    real = int(inputs["attention_mask"][0].sum())
    n_pad = min(pad_to, max_sequence_length) - real
    position_ids = None
    if n_pad > 0:
        inputs, position_ids = _append_padding(model, inputs, n_pad, pad_token_id)
    hidden = model(**inputs, position_ids=position_ids, output_hidden_states=True, use_cache=False).hidden_states
    stacked = torch.stack([hidden[k][0] for k in hidden_layers], dim=1)  # [S, K, D]
    feats = stacked.reshape(stacked.shape[0], -1)                        # [S, K*D]
    if n_pad <= 0:
        feats = feats[inputs["attention_mask"][0].bool()][:max_sequence_length]
    return feats.cpu()


def _append_padding(model, inputs: dict[str, torch.Tensor], n: int,
                    pad_token_id: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`n` pad tokens after the real ones, the way the pipeline's text encoder sees its padding:
    masked as keys (so the real tokens' states do not change: the model is causal) but each a
    query over every real token, at the positions after the last one (Qwen3 numbers tokens by
    index; with M-RoPE the text after the image continues from the image's last position, so a
    text-only input gets exactly the text encoder's positions; `tests/test_teacher_vlm.py` checks
    the result against `Flux2KleinPipeline._get_qwen3_prompt_embeds`, pads included)."""
    if pad_token_id is None:
        raise ValueError("padding the VLM condition needs the pipeline tokenizer's pad_token_id")
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    positions, _ = model.model.get_rope_index(input_ids=ids, mm_token_type_ids=types,
                                              image_grid_thw=inputs.get("image_grid_thw"),
                                              video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)
    tail = positions.amax() + 1 + torch.arange(n, device=ids.device)
    positions = torch.cat([positions, tail.view(1, 1, n).expand(positions.shape[0], 1, n)], dim=2)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((t.shape[0], n), value)], dim=1)

    out = {**inputs, "input_ids": pad(ids, pad_token_id), "attention_mask": pad(mask, 0),
           "mm_token_type_ids": pad(types, 0)}
    return out, positions
