"""Spec-sheet tensor-core rates of the GPUs the time planner knows (`plan --gpu NAME`), with their sources.

The rates are dense (no 2:4 sparsity) peaks: bf16 multiplies with fp32 accumulation, what a bf16 training
step runs, and int8 (int32 accumulation), what `act_quant = "int8"` runs. On GeForce cards bf16 with fp32
accumulation runs at half the fp16-accumulate rate and int8 at four times it (twice on the data-centre
cards); NVIDIA's architecture whitepapers give both for the flagships. For the other GeForce cards the rate
is derived the way the whitepapers' own figures come out: SMs x boost clock x 512 bf16 FLOP per SM per
clock (Ampere GA10x, Ada, GeForce Blackwell), int8 four times that. No GPU but the H100 has been measured
here: every other card's time is a prediction (timeplan.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str
    aliases: tuple[str, ...]     # other spellings than `name` (torch.cuda.get_device_name's)
    bf16_tflops: float           # dense bf16 tensor rate, fp32 accumulate
    int8_tops: float             # dense int8 tensor rate
    source: str
    nvlink: bool = False         # its GPUs sum gradients over NVLink (the SXM boards), not only PCIe


WHITEPAPER_ADA = "NVIDIA Ada GPU Architecture whitepaper, appendix"
WHITEPAPER_GA102 = "NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix A"


def _geforce(name: str, sms: int, boost_mhz: int) -> GPU:
    """A GeForce card without a whitepaper figure: its rate derived from NVIDIA's spec page (SMs, boost clock)."""
    bf16 = sms * boost_mhz * 1e6 * 512 / 1e12
    return GPU(name, (), round(bf16, 1), round(4 * bf16, 1),
               f"derived: {sms} SMs x {boost_mhz} MHz boost (NVIDIA spec page) x 512 FLOP/clock/SM, the per-SM rate "
               f"of the whitepapers' figures")


GPUS = [
    GPU("H100 SXM", ("h100 80gb hbm3", "h100"), 989.4, 1978.9,
        "NVIDIA H100 Tensor Core GPU datasheet, SXM (BF16 1,979 TFLOPS, INT8 3,958 TOPS with sparsity)", True),
    GPU("H100 PCIe", (), 756.5, 1513.0,
        "NVIDIA H100 Tensor Core GPU datasheet, PCIe (BF16 1,513 TFLOPS, INT8 3,026 TOPS with sparsity)"),
    GPU("H200", (), 989.4, 1978.9, "NVIDIA H200 Tensor Core GPU datasheet (SXM: the H100 SXM's rates)", True),
    GPU("A100", (), 312.0, 624.0, "NVIDIA A100 Tensor Core GPU datasheet (BF16 312 TFLOPS, INT8 624 TOPS)", True),
    _geforce("RTX 3060", 28, 1777),
    GPU("RTX 3090", (), 71.0, 284.0, f"{WHITEPAPER_GA102} (GeForce RTX 3090: FP16 tensor 71 TFLOPS "
        "with fp32 accumulate, INT8 284 TOPS)"),
    _geforce("RTX 3090 Ti", 84, 1860),
    _geforce("RTX 4060 Ti", 34, 2535),
    _geforce("RTX 4070", 46, 2475),
    _geforce("RTX 4070 Ti Super", 66, 2610),
    GPU("RTX 4080", (), 97.5, 389.9, f"{WHITEPAPER_ADA} (GeForce RTX 4080: FP16 tensor 97.5 TFLOPS "
        "with fp32 accumulate, INT8 389.9 TOPS)"),
    _geforce("RTX 4080 Super", 80, 2550),
    GPU("RTX 4090", (), 165.2, 660.6, f"{WHITEPAPER_ADA} (GeForce RTX 4090: FP16 tensor 165.2 TFLOPS "
        "with fp32 accumulate, INT8 660.6 TOPS)"),
    _geforce("RTX 5060 Ti", 36, 2572),
    _geforce("RTX 5070 Ti", 70, 2452),
    _geforce("RTX 5080", 84, 2617),
    _geforce("RTX 5090", 170, 2407),
]


def _norm(text: str) -> str:
    """Lowercase words without the brand words: "NVIDIA GeForce RTX 4060 Ti" -> "4060 ti"."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("nvidia", "geforce", "rtx"))


def find_gpu(name: str) -> GPU | None:
    """The GPU a name denotes ("RTX 4090", "4060ti", torch's "NVIDIA GeForce RTX 4060 Ti"): the longest alias
    the name contains (spaces ignored), so a "4070 Ti Super" is not taken for a 4070. None if none does."""
    text = _norm(name).replace(" ", "")
    matches = [(len(a), gpu) for gpu in GPUS for a in (_norm(x).replace(" ", "") for x in (gpu.name, *gpu.aliases))
               if a and a in text]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def gpu_named(name: str) -> GPU:
    """`find_gpu`, or a UserError that lists the known names."""
    gpu = find_gpu(name)
    if gpu is None:
        raise UserError(f"The time planner knows no GPU called '{name}'. Known: {', '.join(g.name for g in GPUS)}. "
                        "Name the closest one; the prediction scales with its spec-sheet tensor rate.")
    return gpu
