"""The one interface a model family implements. The training loop knows nothing else.

A family is a small adapter around one diffusers pipeline: it loads the frozen transformer,
computes the student and teacher conditions at precompute time (encoders are loaded there and
released), and gives the few-step schedule and a velocity in ONE convention:

    x_next = x + (sigma_next - sigma) * v        (diffusers' FlowMatchEulerDiscreteScheduler.step)
    x0     = x - sigma * v                       (sigma = 1 is pure noise, 0 is the image)

The memory planner (plan.py) asks the family class, without a checkpoint, for its architecture
numbers: `k_block`, `c_fwd`, `c_fwd_fused`, `plan_tokens`, `block_streams`, and a tiny model of
its blocks to re-measure `k_block` on (`tiny_transformer`, `block_probes`). Adding a family: see
`families/__init__.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from ..data import Item, load_rgb, training_crop
from ..errors import UserError
from ..files import component_problem, resolve_dir
from ..runtime import DTYPES, release
from .comfy import Layout

if TYPE_CHECKING:
    import PIL.Image

Cond = dict[str, torch.Tensor]  # one item's precomputed condition; stored as safetensors in the cache


@dataclass
class Tokens:
    """Tokens of one sample through the transformer, padded as the transformer pads them (planner)."""

    img: int
    text_student: int
    text_teacher: int
    img_teacher: int       # klein's edit teacher sees the reference latents too: 2 x img

    @property
    def student(self) -> int:
        return self.img + self.text_student

    @property
    def teacher(self) -> int:
        return self.img_teacher + self.text_teacher


def image_tokens(height: int, width: int) -> int:
    """Z-Image and klein: VAE /8, then 2x2 patches (Z-Image's patchify, klein's packed latents)."""
    return (height // 16) * (width // 16)


@dataclass
class BlockProbe:
    """One block of a tiny transformer and a forward through it, for plan.measure_block_activations."""

    block: nn.Module
    inputs: list[torch.Tensor]   # what the block receives: checkpointing keeps these anyway
    forward: Callable[[], Any]
    tokens: int                  # tokens per sample through the block


# Components that are models (config.json + weights), as opposed to tokenizer/ and scheduler/
MODEL_COMPONENTS = ("transformer", "text_encoder", "vae")


FAMILIES: list[type["Family"]] = []


def register(cls: type["Family"]) -> type["Family"]:
    """Class decorator: the family becomes one that checkpoints are matched against."""
    FAMILIES.append(cls)
    return cls


class Family:
    """A model family's adapter; `register` it to make it known (families/__init__.py says how)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]        # diffusers pipeline that loads our LoRA (parity tests, `sample`)
    pipeline_module: ClassVar[str] = "diffusers"  # where `pipeline_class` is imported from
    teachers: ClassVar[tuple[str, ...]]  # teacher kinds this family supports; first = default
    default_rollout_steps: ClassVar[int]
    default_train_states: ClassVar[int] = 0  # states of a roll-out trained by default (0: all of them)
    default_lr: ClassVar[float]
    default_full_lr: ClassVar[float | None] = None  # train_mode = "full" (the paper's, where it gives one)
    lora_targets: ClassVar[tuple[str, ...]]  # module-name suffixes in the transformer that get LoRA
    hf_repo_ids: ClassVar[tuple[str, ...]] = ()  # public ids that resolve to this family
    # Public ids whose config in published/ is not a copy of the published file -> what it is instead
    unpublished_configs: ClassVar[dict[str, str]] = {}
    # Pipeline classes of close relatives this family does not train -> why not (said when one is given)
    near_misses: ClassVar[dict[str, str]] = {}

    takes_transformer_file: ClassVar[bool] = True  # a diffusers transformer: `transformer_file` can replace it
    # Whether `velocity` runs a micro-batch in one transformer call whatever its conditions' lengths (Z-Image
    # takes a list of captions). False: items of different lengths run one at a time (one set of position ids
    # per call; padding would change what the model sees), so the processes of a full fine-tune could make
    # different numbers of sharded passes and wait on each other: preflight.check_method refuses micro_batch > 1.
    one_pass_per_micro_batch: ClassVar[bool] = True

    def __init__(self, model_dir: Path, model_id: str):
        self.model_dir = Path(model_dir)
        self.model_id = model_id  # what the user passed; recorded in outputs
        self.transformer_file: Path | None = None  # a fine-tune's single file (load_family checked it)

    required_components: ClassVar[tuple[str, ...]] = ("transformer", "text_encoder", "tokenizer", "scheduler")
    transformer_class: ClassVar[str]     # diffusers class of `transformer/`
    quant_skip: ClassVar[tuple[str, ...]] = ()  # module-name prefixes kept in the compute dtype (quant.py)
    vlm_hidden_layers: ClassVar[tuple[int, ...]] = (-2,)  # text-encoder layers the pipeline reads
    # Whether the pipeline hands the transformer its caption padded to max_sequence_length (klein:
    # all 512 states, no mask; Z-Image drops the padding): the VLM teacher's condition is then
    # padded the same way, so the teacher sees the layout every training caption had.
    vlm_padded: ClassVar[bool] = False

    def vlm_pad_to(self, cfg) -> int:
        """Length the VLM teacher's condition is padded to (0: not padded); never over its own limit."""
        return min(cfg.max_sequence_length, cfg.teacher_max_sequence_length) if self.vlm_padded else 0

    # ----- the memory planner (plan.py). A family without `k_block` trains but is not planned.
    # Saved activation bytes per token per unit of `dim` of ONE block of each block list (bf16, LoRA
    # on, the LoRA's own per-token intermediates excluded): what autograd keeps for the real block,
    # measured by plan.measure_block_activations on `tiny_transformer` through `block_probes`.
    k_block: ClassVar[dict[str, float]] = {}
    # Transients of a forward without autograd state (the teacher pass), in tokens x dim x 2 bytes:
    # on quanto's 8-bit linears, and on the fused Triton kernel (no dequantised weight, no
    # [tokens, out] LoRA temporaries). Calibrated on a GPU: docs/memory.md, "The planner".
    c_fwd: ClassVar[float] = 0.0
    c_fwd_fused: ClassVar[float] = 0.0
    # Activations outside the blocks that live through the whole student pass, in tokens x dim x 2
    # bytes per student token (FLUX.3's per-token modulation tensors); 0 for models that modulate per
    # sample (their little is in the calibrated backward temporaries).
    c_outside: ClassVar[float] = 0.0
    # Block lists only the teacher's pass runs (FLUX.3's reference-image blocks): in the model, not in
    # the student's `block_streams`.
    teacher_only_blocks: ClassVar[tuple[str, ...]] = ()
    # Measured roll-out seconds, {GPU name (gpus.py): {path: s}}, at the 16gb preset's settings, 1024²,
    # micro_batch 1, rank 64, every state trained, the default teacher; the path is how the linears ran:
    # "fused" (our 8-bit kernel), "act8", "quanto" or "bf16". `measured_in`: the result file. The time
    # planner's efficiencies (timeplan.py).
    measured_rollout_s: ClassVar[dict[str, dict[str, float]]] = {}
    measured_in: ClassVar[str] = ""
    # Of those, the fused kernel's on one H100: what `plan --gpus N` prices a step with (scaling.py). 0: never
    # measured.
    rollout_s_h100: ClassVar[float] = 0.0

    @classmethod
    def plan_tokens(cls, height: int, width: int, text_student: int, text_teacher: int, teacher: str) -> Tokens:
        """Tokens per sample of the student's and the teacher's passes at this size, text lengths and
        teacher kind, padded as the transformer pads them."""
        raise NotImplementedError

    @classmethod
    def block_streams(cls, blocks: dict[str, int], tok: Tokens) -> list[tuple[str, int, int]]:
        """(block list, number of blocks, tokens through each) of the student's forward, from the number
        of blocks in each of the transformer's block lists."""
        raise NotImplementedError

    @classmethod
    def tiny_transformer(cls, dim_heads: int) -> nn.Module:
        """A small bf16 model of the real class, one block per block list, `dim_heads` x 128 wide."""
        raise NotImplementedError

    @classmethod
    def block_probes(cls, model: nn.Module, tokens: int, text: int, batch: int) -> dict[str, BlockProbe]:
        """A forward through one block of each kind in `tiny_transformer`'s model, keyed by the block list
        whose `k_block` it measures, with `tokens` image and `text` text tokens per sample, `batch` samples."""
        raise NotImplementedError

    # ----- detection
    @classmethod
    def matches(cls, model_index: dict[str, Any]) -> bool:
        return model_index.get("_class_name") == cls.pipeline_class

    def check_components(self, model_index: dict[str, Any]) -> None:
        missing = [c for c in self.required_components if not (self.model_dir / c).is_dir()]
        if missing:
            raise UserError(
                f"The {self.name} checkpoint at '{self.model_dir}' is missing {', '.join(missing)}/ "
                f"(a {self.pipeline_class} folder has {', '.join(self.required_components)}). "
                "The download is probably incomplete: download the model again."
            )

    def check_files(self) -> None:
        """Every component folder holds its files, weights as safetensors: a half-finished download
        fails here in a second, not after minutes of encoding with a loader's traceback."""
        for component in self.required_components:
            if component == "transformer" and self.transformer_file:  # weights from the file: its config only
                if not (self.model_dir / component / "config.json").is_file():
                    raise UserError(f"The {self.name} checkpoint at '{self.model_dir}': transformer/ has no "
                                    "config.json (transformer_file takes its architecture from there). The "
                                    "download is probably incomplete: download the model again.")
                continue
            if problem := component_problem(self.model_dir / component, model=component in MODEL_COMPONENTS):
                raise UserError(f"The {self.name} checkpoint at '{self.model_dir}': {component}/ {problem}")

    # ----- precompute (encoders live only inside these calls)
    def encoder_identity(self, teacher: str, cfg) -> dict[str, Any]:
        """Everything that changes the cached features: goes into the cache key."""
        raise NotImplementedError

    def encode_student(self, captions: list[str], cfg, device: torch.device) -> list[Cond]:
        raise NotImplementedError

    def encode_teacher(self, items: list[Item], teacher: str, cfg, device: torch.device) -> list[Cond]:
        raise NotImplementedError

    def matching_vlm(self) -> str | None:
        """The public Qwen3-VL whose language model has this model's text encoder's shape (the vlm
        teacher's graft needs the pair), or None when there is none we know."""
        return None

    def teacher_encoder(self, cfg) -> str:
        """`cfg.teacher_encoder`, except that the shipped default (Qwen3-VL-4B-Instruct, Qwen3-4B's match)
        becomes the model's own match: a klein 9B (Qwen3-8B) gets Qwen3-VL-8B-Instruct."""
        from ..config import DEFAULT_TEACHER_VLM
        return (self.matching_vlm() or cfg.teacher_encoder) if cfg.teacher_encoder == DEFAULT_TEACHER_VLM \
            else cfg.teacher_encoder

    def vlm_dir(self, cfg) -> Path:
        """The Qwen3-VL checkpoint of the `vlm` teacher (folder or Hugging Face id)."""
        path = resolve_dir(self.teacher_encoder(cfg), "Qwen3-VL teacher encoder (--teacher-encoder)",
                           needs="config.json")
        if problem := component_problem(path):
            raise UserError(f"The teacher encoder (Qwen3-VL) folder '{path}' {problem}")
        return path

    def vlm_reply_prefix(self) -> str:
        """Text the vlm teacher's chat gets after the assistant turn opens (DiffusersFamily: what its
        pipeline's template puts there); none by default."""
        return ""

    def vlm_image_identity(self, cfg) -> dict[str, Any]:
        """What the vlm teacher's image is, for the cache key: the training crop, set by `resolution`."""
        return {"image": "training crop (data.training_crop)", "resolution": cfg.resolution}

    def encode_vlm_teacher(self, items: list[Item], cfg, device: torch.device) -> list[Cond]:
        """The paper's teacher condition: image + caption through Qwen3-VL whose language model is
        the text encoder (teacher_vlm.py), read at the same layers the pipeline reads. The image is
        the item's training crop (data.training_crop), what the student is trained to produce."""
        from ..teacher_vlm import encode_vlm, load_grafted_vlm

        dtype = DTYPES[cfg.dtype]
        pad_to, pad_id = self.vlm_pad_to(cfg), None
        if pad_to:  # with the pad token of the pipeline's own tokenizer
            from transformers import AutoTokenizer
            pad_id = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer").pad_token_id
        model, builder = load_grafted_vlm(self.vlm_dir(cfg), self.model_dir / "text_encoder", device, dtype,
                                          reply_prefix=self.vlm_reply_prefix())
        out = []
        for item in items:
            image = training_crop(load_rgb(item.image_path), item.width, item.height)
            (emb,) = encode_vlm(model, builder, [item.caption], [image],
                                hidden_layers=self.vlm_hidden_layers,
                                max_sequence_length=cfg.teacher_max_sequence_length,
                                min_pixels=cfg.vlm_min_pixels, max_pixels=cfg.vlm_max_pixels,
                                pad_to=pad_to, pad_token_id=pad_id)
            out.append({"cap": emb.to(dtype).cpu()})
        release(model)
        return out

    # ----- training
    def load_transformer(self, cfg, device: torch.device, dtype: torch.dtype,
                         on_unit: Callable[[str, nn.Module], None] | None = None) -> nn.Module:
        """The frozen base: built on `meta`, filled and quantized block by block on `device`, so no
        full bf16 copy is ever held in host RAM or on the GPU (quant.load_frugal). With `transformer_file`,
        the weights come from that single file, the architecture from transformer/config.json.
        `on_unit(name, block)`: called on each block as it is loaded (full.py shards it there)."""
        import diffusers

        from ..quant import load_frugal

        model = load_frugal(getattr(diffusers, self.transformer_class), self.model_dir / "transformer", device,
                            dtype, cfg.quant, skip=self.quant_skip,
                            weights_file=self.transformer_file or getattr(cfg, "transformer_file", "") or None,
                            on_unit=on_unit)
        model.requires_grad_(False).eval()
        model._dopsd_dtype = dtype  # compute dtype; parameters mix int8, bf16 and fp32 LoRA
        if cfg.grad_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one item's initial noise (no batch dim), exactly as the pipeline draws it."""
        raise NotImplementedError

    def sigmas(self, height: int, width: int, steps: int) -> torch.Tensor:
        """The pipeline's few-step schedule: `steps + 1` sigmas from 1 down to 0, float32, CPU."""
        raise NotImplementedError

    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma: float, conds: list[Cond],
                 sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        """v at state x (batch first) and noise level sigma, in the convention of the module docstring.
        `sigma_next`: the sigma this roll-out step goes to; only a flow-map model (FLUX.3's distilled
        transformer) reads it, the others predict v from (x, sigma) alone."""
        raise NotImplementedError

    def random_conditions(self, teacher: str, cfg, device: torch.device, dtype: torch.dtype) -> tuple[Cond, Cond]:
        """One item's student and teacher conditions: random values in the shapes the encoders give at
        these settings (the memory benchmark trains without loading any encoder)."""
        raise NotImplementedError

    # ----- reporting
    def prompt_warnings(self, captions: list[str], names: list[str], teacher: str, cfg) -> list[str]:
        """Warnings about the prompts this run will encode (e.g. cut at max_sequence_length)."""
        return []

    def run_notes(self, teacher: str, cfg) -> dict[str, str]:
        """Family-specific settings of this run (setting name -> value): shown in the run summary and
        recorded in the LoRA's metadata, e.g. klein's `edit_instruction` for its edit teacher."""
        return {}

    # ----- previews and sampling
    # Extra arguments the stock pipeline needs for the model's own few-step sampling (`sample`).
    pipeline_call_kwargs: ClassVar[dict[str, Any]] = {}

    def load_code(self, model: str, transformer: str = "") -> str:
        """Python that loads the stock pipeline as `pipe` (the run's closing "load it" line); `transformer`: the
        name of a variable holding the transformer it gets instead of the model's (a full fine-tune's)."""
        return (f"from {self.pipeline_module} import {self.pipeline_class}; pipe = {self.pipeline_class}"
                f".from_pretrained({model!r}{f', transformer={transformer}' if transformer else ''}); ")

    def stock_pipeline(self, dtype: torch.dtype, **kwargs):
        """The stock diffusers pipeline of this folder (`sample`, `eval`): DiffusionPipeline.from_pretrained,
        `kwargs` passed on (a transformer read from a single file, trust_remote_code)."""
        from diffusers import DiffusionPipeline
        return DiffusionPipeline.from_pretrained(self.model_dir, dtype=dtype, use_safetensors=True, **kwargs)

    def place(self, pipe, device: torch.device, offload: bool) -> None:
        """The stock pipeline on `device`, or (`offload`) each model moved there only while it runs."""
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)

    def draw(self, pipe, prompt: str, steps: int, width: int, height: int, generator) -> "PIL.Image.Image":
        """One image from the stock pipeline, in the model's own few-step sampling. The prompt by name: a
        pipeline's first argument may be another (Flux2KleinPipeline's is `image`)."""
        return pipe(prompt=prompt, num_inference_steps=steps, width=width, height=height, generator=generator,
                    **self.pipeline_call_kwargs).images[0]

    @property
    def in_diffusers(self) -> bool:
        """Whether `pipeline_class` is a stock diffusers pipeline (`sample` needs one; the toy's is ours)."""
        import diffusers
        try:
            return getattr(diffusers, self.pipeline_class, None) is not None
        except AttributeError:  # diffusers' lazy module raises for unknown names
            return False

    def decode_latents(self, latents: torch.Tensor) -> list["PIL.Image.Image"]:
        """Final latents (batch first, as `latent_shape`, on any device) -> PIL images, decoded exactly as
        the pipeline decodes. The VAE is loaded on `latents.device` for this call only, then released."""
        raise NotImplementedError

    # ----- output
    # The key layout ComfyUI's LoRA loader maps for this model (families/comfy.py); None: no export.
    comfy_layout: ClassVar[Layout | None] = None

    @classmethod
    def single_file_layout(cls) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
        """A full fine-tune's single file (full_io.py): whole blocks of diffusers tensors -> the original key
        layout that diffusers' from_single_file reads (ComfyUI's native one where ComfyUI has the model, then
        the file goes in comfyui/); None: no single file."""
        return cls.comfy_layout.model_to_comfy if cls.comfy_layout else None


class DiffusersFamily(Family):
    """A family whose checkpoint is a diffusers pipeline folder: reads the latent geometry from its
    VAE/transformer configs and steps with the folder's own FlowMatchEulerDiscreteScheduler."""

    def __init__(self, model_dir: Path, model_id: str):
        super().__init__(model_dir, model_id)
        vae_cfg = self.model_dir / "vae" / "config.json"
        blocks = len(json.loads(vae_cfg.read_text())["block_out_channels"]) if vae_cfg.is_file() else 4
        self.vae_scale_factor = 2 ** (blocks - 1)  # as the pipelines' __init__
        self._scheduler = None
        self._reply_prefix: str | None = None  # vlm_reply_prefix, read once (a Qwen tokenizer load)

    # Qwen3 text encoders (hidden size, layers) -> the Qwen3-VL-Instruct with that language model: same
    # hidden size, layers, heads and FFN width (Qwen3-4B / Qwen3-VL-4B: 2560, 36, 32/8 heads, 9728;
    # Qwen3-8B / Qwen3-VL-8B: 4096, 36, 32/8 heads, 12288; sources in published/README.md).
    MATCHING_VLMS: ClassVar[dict[tuple[int, int], str]] = {
        (2560, 36): "Qwen/Qwen3-VL-4B-Instruct", (4096, 36): "Qwen/Qwen3-VL-8B-Instruct"}

    def matching_vlm(self) -> str | None:
        try:
            te = json.loads((self.model_dir / "text_encoder" / "config.json").read_text())
            return self.MATCHING_VLMS.get((te["hidden_size"], te["num_hidden_layers"]))
        except (OSError, ValueError, KeyError):
            return None

    @cached_property
    def in_channels(self) -> int:  # read when first used: load_family checks the folder's files first
        return json.loads((self.model_dir / "transformer" / "config.json").read_text())["in_channels"]

    # The pipelines wrap each prompt in the tokenizer's chat template before tokenizing with
    # truncation at max_sequence_length: ZImagePipeline with enable_thinking=True, Flux2KleinPipeline
    # with False. Counting the same way tells us which captions the pipeline will cut.
    chat_enable_thinking: ClassVar[bool] = True

    def encoded_prompts(self, captions: list[str], teacher: str, cfg) -> dict[str, list[str]]:
        """The text prompts this run feeds the pipeline's prompt encoder, by role."""
        return {"caption": list(captions)}

    def prompt_token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens the pipeline's prompt encoder sees per prompt, before its truncation."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
        return [len(tokenizer(tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
            enable_thinking=self.chat_enable_thinking)).input_ids) for p in prompts]

    def vlm_reply_prefix(self) -> str:
        """What the pipeline's own chat template puts after the assistant turn opens: '' for Z-Image,
        an empty think block for klein (enable_thinking=False). The vlm teacher's text gets it too, so
        the two conditions differ by the image alone. Asked by the cache key (encoder_identity, twice a
        run) and the encoder: the tokenizer is loaded once."""
        if self._reply_prefix is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
            text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=self.chat_enable_thinking)
            opened = "<|im_start|>assistant\n"
            self._reply_prefix = text.rsplit(opened, 1)[1] if opened in text else ""
        return self._reply_prefix

    def prompt_warnings(self, captions: list[str], names: list[str], teacher: str, cfg) -> list[str]:
        limit, out = cfg.max_sequence_length, []
        roles = self.encoded_prompts(captions, teacher, cfg)
        # one call (one tokenizer load) for every role's prompts, then handed out per role
        counts = iter(self.prompt_token_counts([p for prompts in roles.values() for p in prompts]))
        for role, prompts in roles.items():
            lengths = [next(counts) for _ in prompts]
            cut = [(n, name) for n, name in zip(lengths, names) if n > limit]
            if cut:
                longest, name = max(cut)
                out.append(f"{len(cut)} of {len(prompts)} {role} prompts are longer than max_sequence_length = "
                           f"{limit} tokens (longest: {name}, {longest} tokens with the chat template); the "
                           f"pipeline keeps the first {limit} tokens, so their ends are not seen in training. "
                           f"Shorten them, or raise it: --set max_sequence_length=512 (the pipeline's default).")
        return out

    def scheduler(self):
        if self._scheduler is None:
            from diffusers import FlowMatchEulerDiscreteScheduler
            self._scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.model_dir / "scheduler")
        return self._scheduler
