"""8-bit frozen base, shared by student and teacher, and a loader that never holds two copies.

Backends (`quant` in the config):

    none      the base stays in the compute dtype (bf16: 2 bytes/parameter)
    qint8     optimum-quanto, int8 weights with one scale per output channel (weight-only: the
              activations stay bf16; the int8 weight is dequantized per layer inside the matmul)
    qfloat8   optimum-quanto, FP8 e4m3 weights with per-channel scales (weight-only). On a CUDA GPU
              with compute capability >= 8, quanto routes these layers through its Marlin FP8 kernel,
              which it compiles on first use (needs nvcc); the CPU path dequantizes like qint8.
    bnb-int8  bitsandbytes LLM.int8(): int8 weights (row-wise absmax scales) AND int8 activations
              (per-token absmax), with activation columns above `BNB_THRESHOLD` in fp16
              (mixed-precision decomposition). Matmuls run as fp16 internally.

A 6B bf16 base drops from ~11.5 GiB to ~5.8 GiB. LoRA weights stay fp32 beside it (lora.py):
`DualLoRALinear` wraps the quantized layers of every backend (they are all `nn.Linear`
subclasses with `in_features`, `out_features` and `weight`), and gradients flow through them to
the LoRA factors of earlier layers (each backend has a backward for its input).

Layers named in `skip` (module-name prefixes such as "t_embedder") stay in the compute dtype: the
embedders and the final projection are precision-sensitive and hold well under 1% of the
parameters.

Memory-frugal loading (`load_frugal`): the transformer is built on the `meta` device from its
config (no memory), then filled ONE BLOCK AT A TIME: the block's tensors are read from the
safetensors shards straight to the target device, the block is quantized there, and the next block
follows. Peak host memory is one block plus the safetensors header (not the 12 GB bf16 model, as
with `from_pretrained` on the CPU followed by quantization), and peak GPU memory is the quantized
model plus one bf16 block (not the bf16 model: a 16 GB card could not even hold 11.5 GiB of bf16
weights next to the CUDA context and still quantize).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import CHOICES
from .errors import UserError
from .files import WEIGHT_FILES, is_lora, shard_index

BACKENDS = CHOICES["quant"]  # the config validates `quant` against the same tuple
QUANTO = ("qint8", "qfloat8")  # the backends whose 8-bit layers the fused Triton kernel runs
# LLM.int8() outlier threshold (the paper's and transformers' default `llm_int8_threshold`).
BNB_THRESHOLD = 6.0


# ---------------------------------------------------------------------------------------------
# Which linears get quantized
# ---------------------------------------------------------------------------------------------
def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def _require(kind: str):
    if kind in QUANTO:
        try:
            from optimum import quanto
        except ImportError as exc:
            raise UserError(
                f"quant = '{kind}' needs optimum-quanto: `pip install optimum-quanto` (or "
                "`pip install lowvram-dopsd[quant]`), or set quant = 'none' (needs ~2x the base's memory)."
            ) from exc
        return quanto
    if kind == "bnb-int8":
        import warnings

        # bitsandbytes warns on every call that bf16 inputs are cast to fp16 for the int8 matmul
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError(
                "quant = 'bnb-int8' needs bitsandbytes: `pip install bitsandbytes` (or "
                "`pip install lowvram-dopsd[quant]`), or choose quant = 'qint8' (optimum-quanto)."
            ) from exc
        return bnb
    raise UserError(f"Unknown quant backend '{kind}'; choose one of {', '.join(BACKENDS)}.")


class _LLMInt8Function(torch.autograd.Function):
    """LLM.int8() forward, and a backward for the INPUT only (the weight is frozen).

    bitsandbytes' own `MatMul8bitLt` keeps its inputs as plain `ctx` attributes instead of
    `save_for_backward`, so gradient checkpointing cannot drop them: with it, every 8-bit linear of
    every block kept its input alive through the forward (measured on an H100: 25.2 GiB peak instead
    of 10.4 for Z-Image at 1024²). Here nothing is saved but a reference to the layer; the backward
    multiplies by the dequantized weight, which is exactly bitsandbytes' own input gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return _bnb_forward(layer, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        layer = ctx.layer
        scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
        w = layer.weight.data.to(grad.dtype) * (scb.to(grad.dtype) / 127.0).unsqueeze(1)
        return grad @ w, None


def _bnb_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.nn.Linear8bitLt.forward(layer, x)


def _bnb_class():
    import bitsandbytes as bnb

    class Int8Linear(bnb.nn.Linear8bitLt):
        """`Linear8bitLt` whose autograd state is checkpointing-friendly (see _LLMInt8Function)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and x.requires_grad:
                return _LLMInt8Function.apply(x, self)
            return _bnb_forward(self, x)

    return Int8Linear


def _bnb_linear(linear: nn.Linear):
    """An LLM.int8() replacement for `linear`, quantized where the weight already lives (CPU or GPU)."""
    import bitsandbytes as bnb

    w = linear.weight.detach()
    q = _bnb_class()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     has_fp16_weights=False, threshold=BNB_THRESHOLD, device="meta")
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
    q.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return q


def _replacement(kind: str) -> Callable[[nn.Linear], nn.Module]:
    lib = _require(kind)
    if kind == "bnb-int8":
        return _bnb_linear
    weights = {"qint8": lib.qint8, "qfloat8": lib.qfloat8}[kind]

    def make(linear: nn.Linear) -> nn.Module:
        q = lib.nn.quantize_module(linear, weights=weights)
        q.freeze()  # float weight -> its quantized form now; the float copy is freed with `linear`
        q.requires_grad_(False)
        return q

    return make


def quantize_frozen(model: nn.Module, kind: str, skip: tuple[str, ...] = (), prefix: str = "") -> nn.Module:
    """Replace, in place, every nn.Linear of `model` not under `skip` by its 8-bit form.

    `prefix` is `model`'s own qualified name inside a larger model (for `skip` matching when a single
    block is quantized during loading). Returns `model`.
    """
    if kind == "none":
        return model
    make = _replacement(kind)

    def full(n: str) -> str:
        return f"{prefix}.{n}" if prefix and n else (prefix or n)

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n and not _skipped(full(n), skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))
    return model


def int8_view(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(w_q [N, K] int8 or float8_e4m3fn, per-output-channel scale [N]) of a quanto-quantized
    linear, or None when the module's weight is not an 8-bit per-channel tensor."""
    w = getattr(module, "weight", None)
    data, scale = getattr(w, "_data", None), getattr(w, "_scale", None)
    if data is None or scale is None or data.dtype not in (torch.int8, torch.float8_e4m3fn):
        return None
    if data.dim() != 2 or scale.numel() != data.shape[0]:
        return None
    return data, scale.reshape(-1)


def use_fused_linear(device: torch.device, kernels: str) -> bool:
    """Whether 8-bit LoRA layers run on the fused Triton kernel, under the run's `kernels` setting.

    "on": always (the kernel raises if Triton cannot run). "off": never (quanto's dequantise +
    matmul). "auto": on a CUDA device where Triton runs, where it is faster than quanto and its
    teacher pass holds no dequantised weight (docs/kernels.md, "Measured"); not on the CPU
    interpreter, far too slow to train.
    """
    from .kernels.utils import kernels_available

    return kernels == "on" or (kernels == "auto" and device.type == "cuda" and kernels_available(device))


def fused_linear_planned(kernels: str, quant: str) -> bool:
    """What `use_fused_linear` will answer on a CUDA GPU, from the config alone (the memory plan):
    only quanto's 8-bit layers have the fused kernel; "auto" counts on it where Triton imports (CUDA
    builds of torch on Linux ship it; on Windows it may be missing, and the plan then counts quanto's
    larger teacher-pass transients)."""
    from .kernels.utils import HAS_TRITON

    return quant in QUANTO and (kernels == "on" or (kernels == "auto" and HAS_TRITON))


# ---------------------------------------------------------------------------------------------
# Memory-frugal loading: meta model, filled and quantized block by block
# ---------------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> safetensors file, from the files from_pretrained reads (`WEIGHT_FILES`: a shard
    index first, then the single file); None if there are none. Other .safetensors beside them (an
    `.fp16` variant of a full download) are ignored, as from_pretrained ignores them: counting them
    used to send such a folder to the whole-model fallback, at twice the host RAM."""
    index = shard_index(folder)
    if index is not None:
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / name), framework="pt") as f:
                return {k: folder / name for k in f.keys()}
    return None


class Rows(tuple):
    """Where one tensor of the model lies in a single-file checkpoint: (file, source tensor name, row runs
    [(start, stop), ...] of its dim 0, concatenated in order; None = the whole tensor)."""


_ROW_BITS = 32  # placeholder value = source id << _ROW_BITS | row


def check_transformer_file(path: str | Path) -> Path:
    """A `transformer_file` the loader may read: an existing .safetensors file (never a pickle) with a
    readable header. Returns its resolved path."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"transformer_file '{path}' does not exist{' (it is a folder)' if path.is_dir() else ''}. "
                        "Pass the path of the fine-tune's .safetensors file.")
    if path.suffix != ".safetensors":
        raise UserError(f"transformer_file '{path}' is not a .safetensors file. Formats such as .ckpt, .pt and .bin "
                        "are pickles, which can run code when loaded; this tool reads safetensors only. Download "
                        "the .safetensors version of the fine-tune.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if not names:
                raise ValueError("it holds no tensors")
    except Exception as exc:  # SafetensorsError, OSError, ...
        raise UserError(f"transformer_file '{path}' is not a readable safetensors file ({exc}). The download is "
                        "probably incomplete: download it again.") from exc
    if is_lora(names):
        raise UserError(f"transformer_file '{path}' is a LoRA, not a transformer. A LoRA to train further goes to "
                        "--init-lora, one to try to `lowvram-dopsd sample --lora`; --transformer-file takes a "
                        "fine-tune's (or merge's) whole transformer.")
    return path.resolve()


def single_file_map(model_cls, path: str | Path, model_keys: list[str]) -> dict[str, Path | Rows]:
    """Tensor name of `model_cls` -> where to read it in the single-file checkpoint `path`, without reading
    any weight. A file in diffusers key layout maps directly. Otherwise diffusers' own converter for the
    class (the one `from_single_file` runs) is run on placeholders: for each source tensor a 1-D int64
    tensor of length shape[0] holding (source id, row index), so each converted tensor says which source
    tensor and which of its rows it is made of (renames, q/k/v splits, scale/shift swaps)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    scaled = [k for k in shapes if k.endswith(("scaled_fp8", ".scale_weight", ".weight_scale", ".input_scale"))]
    if scaled:  # the float8 weights only mean something times these scales: loaded as is they would be wrong
        raise UserError(f"transformer_file '{path}' is a scaled-FP8 checkpoint ({scaled[0]}); this loader reads "
                        "plain bf16/fp16/fp32 (or unscaled FP8) weights. Use the bf16 or fp16 version of the fine-tune.")
    if set(model_keys) == set(shapes):  # diffusers layout (from_single_file converts nothing either)
        return {k: path for k in shapes}
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    spec = SINGLE_FILE_LOADABLE_CLASSES.get(model_cls.__name__)
    present = [k for k in model_keys if k in shapes]
    if spec is None:
        raise UserError(f"transformer_file '{path}' is not in diffusers key layout (it lacks "
                        f"{len(model_keys) - len(present)} of the model's {len(model_keys)} tensors), and diffusers "
                        f"has no converter for {model_cls.__name__} from other layouts.")
    names = list(shapes)
    placeholders = {}
    for i, k in enumerate(names):
        n = shapes[k][0] if shapes[k] else 1
        placeholders[k] = (i << _ROW_BITS) + torch.arange(n, dtype=torch.int64)
    try:
        converted = spec["checkpoint_mapping_fn"](checkpoint=placeholders, config=None)
    except Exception as exc:
        raise UserError(f"transformer_file '{path}': its key layout is neither diffusers' nor one diffusers' "
                        f"{model_cls.__name__} converter reads ({type(exc).__name__}: {exc}). Is it a "
                        f"{model_cls.__name__.replace('Transformer2DModel', '')} transformer?") from exc
    out: dict[str, Path | Rows] = {}
    for key, t in converted.items():
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.dim() == 1 and t.numel()):
            raise UserError(f"transformer_file '{path}': diffusers' converter builds {key} in a way this loader "
                            "cannot map to rows of the file (not a rename, split or reorder along dim 0).")
        ids, rows = (t >> _ROW_BITS).tolist(), (t & ((1 << _ROW_BITS) - 1)).tolist()
        src = names[ids[0]] if 0 <= ids[0] < len(names) else None
        if src is None or any(i != ids[0] for i in ids) or not shapes[src] and rows != [0]:
            raise UserError(f"transformer_file '{path}': diffusers' converter builds {key} from several tensors "
                            "or by arithmetic; this loader reads row slices of one tensor only.")
        if not shapes[src]:
            out[key] = Rows((path, src, None))
            continue
        runs, start = [], rows[0]
        for a, b in zip(rows, rows[1:] + [None]):
            if b != a + 1:
                runs.append((start, a + 1))
                start = b
        whole = runs == [(0, shapes[src][0])]
        out[key] = path if whole and src == key else Rows((path, src, None if whole else tuple(runs)))
    missing = [k for k in model_keys if k not in out]
    if missing:
        raise UserError(f"transformer_file '{path}' has no tensor for {missing[0]} (and {len(missing) - 1} more of "
                        f"the model's {len(model_keys)}), in diffusers' or the original key layout: it is not a "
                        f"{model_cls.__name__} for this model's config.")
    return out


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The loading units: each block of every top-level ModuleList (or of the ModuleLists of a top-level
    ModuleDict: FLUX.3's per-mode `mode_blocks`), and every other top-level child."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            out += [(f"{name}.{i}", block) for i, block in enumerate(child)]
        elif isinstance(child, nn.ModuleDict) and child and all(isinstance(c, nn.ModuleList) for c in child.values()):
            out += [(f"{name}.{key}.{i}", block) for key, blocks in child.items() for i, block in enumerate(blocks)]
        else:
            out.append((name, child))
    return out


def _read(keys: list[str], files: dict[str, Path], device: torch.device) -> dict[str, torch.Tensor]:
    """Read `keys` to `device`. Each shard is opened (memory-mapped) only for this call, so the mapped
    pages are released again: host RSS stays near one unit's size."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k][0] if isinstance(files[k], Rows) else files[k], []).append(k)
    out = {}
    dev = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device=dev) as f:
            for k in names:
                where = files[k]
                if not isinstance(where, Rows):
                    out[k] = f.get_tensor(k)
                elif where[2] is None:
                    out[k] = f.get_tensor(where[1])
                else:  # only the rows this tensor is made of (a third of a fused q/k/v, ...)
                    part = f.get_slice(where[1])
                    pieces = [part[a:b].to(dev) for a, b in where[2]]  # (.to: a no-op where slices land on dev)
                    out[k] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return out


def _kept_fp32(name: str, keep: tuple[str, ...]) -> bool:
    """Whether diffusers' from_pretrained keeps this tensor in fp32 whatever the dtype: a part of its name is
    one of the class's `_keep_in_fp32_modules` (FLUX.3: its QK norms; model_loading_utils.load_model_dict_into_meta)."""
    return any(m in name.split(".") for m in keep)


def _fill(module: nn.Module, prefix: str, files: dict[str, Path], device: torch.device,
          dtype: torch.dtype, keep: tuple[str, ...] = ()) -> None:
    names = list(module.state_dict(keep_vars=True).keys())
    full = [f"{prefix}.{n}" if prefix else n for n in names]
    missing = [k for k in full if k not in files]
    if missing:
        raise UserError(f"The checkpoint has no tensor {missing[0]} (and {len(missing) - 1} more): it does not "
                        "match this model's config. Download the model again.")
    tensors = _read(full, files, device)
    expected = module.state_dict(keep_vars=True)
    wrong = [(k, tuple(tensors[k].shape), tuple(expected[n].shape)) for n, k in zip(names, full)
             if tuple(tensors[k].shape) != tuple(expected[n].shape)]
    if wrong:
        k, got, want = wrong[0]
        raise UserError(f"The checkpoint's {k} has shape {list(got)}, the model's config says {list(want)} (and "
                        f"{len(wrong) - 1} more differ): the weights do not fit this model's config (another "
                        "model size or family?).")
    state = {n: _own(t, torch.float32 if _kept_fp32(k, keep) else dtype, device)
             for n, k, t in zip(names, full, (tensors[k] for k in full))}
    module.load_state_dict(state, assign=True, strict=True)


def _own(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor in the compute dtype, in memory of its own. On the CPU, safetensors hands out views
    of the memory-mapped file: one surviving view keeps the whole shard mapped (its pages stay
    resident), so tensors kept as they are get copied."""
    if t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t.clone() if device.type == "cpu" else t


def _trim_host_heap() -> None:
    """Give freed host memory back to the OS (glibc keeps freed blocks of a block-by-block load)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_frugal(model_cls, folder: str | Path, device: torch.device, dtype: torch.dtype, kind: str,
                skip: tuple[str, ...] = (), weights_file: str | Path | None = None,
                on_unit: Callable[[str, nn.Module], None] | None = None) -> nn.Module:
    """Build `model_cls` from `folder/config.json` on meta, then load + quantize it unit by unit on `device`.

    `weights_file`: a single .safetensors file (a fine-tune; diffusers or original key layout, see
    `single_file_map`) read instead of the folder's weights. Falls back to `from_pretrained` (then
    quantization of the whole model) when the folder holds no safetensors weights.
    `on_unit(name, module)`: called on each unit once it is loaded (full fine-tuning shards it there).
    """
    folder = Path(folder)
    files = None if weights_file else _weight_files(folder)
    if kind != "none":
        _require(kind)
    if files is None and not weights_file:
        model = model_cls.from_pretrained(folder, dtype=dtype, low_cpu_mem_usage=True, use_safetensors=True)
        model.requires_grad_(False)
        quantize_frozen(model, kind, skip)
        return model.to(device)
    with torch.device("meta"):
        model = model_cls.from_config(model_cls.load_config(folder))
    model.requires_grad_(False)
    if weights_file:
        files = single_file_map(model_cls, weights_file, list(model.state_dict().keys()))
    for p_name, p in list(model.named_parameters(recurse=False)) + list(model.named_buffers(recurse=False)):
        _fill_direct(model, p_name, files, device, dtype)
    keep = tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ())
    for prefix, module in units(model):
        _fill(module, prefix, files, device, dtype, keep)
        if kind != "none" and not _skipped(prefix, skip):
            quantize_frozen(module, kind, skip, prefix=prefix)
        module.requires_grad_(False)
        if on_unit is not None:
            on_unit(prefix, module)
        if device.type == "cpu":
            _trim_host_heap()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise UserError(f"Loading left {left[0]} unset (not in the checkpoint). This model class keeps state the "
                        "frugal loader does not know; report it with the model id.")
    return model


def _fill_direct(model: nn.Module, name: str, files: dict[str, Path], device: torch.device,
                 dtype: torch.dtype) -> None:
    """A parameter or buffer that sits on the top-level model itself (e.g. Z-Image's pad tokens)."""
    if name not in files:
        return  # a non-persistent buffer: reported by the final meta check if it stays unset
    t = _own(_read([name], files, device)[name], dtype, device)
    current = getattr(model, name)
    if tuple(t.shape) != tuple(current.shape):
        raise UserError(f"The checkpoint's {name} has shape {list(t.shape)}, the model's config says "
                        f"{list(current.shape)}: the weights do not fit this model's config (another model size "
                        "or family?).")
    if isinstance(current, nn.Parameter):
        setattr(model, name, nn.Parameter(t, requires_grad=False))
    else:
        setattr(model, name, t)


# ---------------------------------------------------------------------------------------------
# What the quantized model actually holds (tests and the planner's calibration use this)
# ---------------------------------------------------------------------------------------------
def storage_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's tensors, by kind: quantized linear weights (data + scales), other
    parameters and buffers. Counts each storage once (quanto and bnb keep views of one buffer)."""
    seen: set[int] = set()
    out = {"quantized": 0, "other": 0}

    def add(t: torch.Tensor, bucket: str) -> None:
        for inner in _leaves(t):
            if inner.is_meta:
                continue
            key = inner.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            out[bucket] += inner.untyped_storage().nbytes()

    for _, module in model.named_modules():
        quantized = type(module) is not nn.Linear and isinstance(module, nn.Linear)
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            add(t, "quantized" if quantized and name == "weight" else "other")
        if quantized and getattr(module.weight, "SCB", None) is not None:  # bnb keeps scales beside
            add(module.weight.SCB, "quantized")
        state = getattr(module, "state", None)
        if quantized and state is not None and getattr(state, "SCB", None) is not None:
            add(state.SCB, "quantized")
    return out


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a (possibly quanto subclass) tensor."""
    inner_names = getattr(t, "__tensor_flatten__", None)
    if inner_names is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _leaves(getattr(t, n))]
    return [t]
