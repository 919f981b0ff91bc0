"""Compile the kernels for a GPU architecture on a machine that has no GPU.

The CPU tests run the kernels through Triton's interpreter, which checks what they compute but not
whether they compile: the real compiler has its own rules (dot operand types and layouts, launch
options such as ``enable_fp_fusion``), and what a tile costs in registers and shared memory is only
known after ptxas. A config that spills registers, or needs more shared memory than a 24 GB
consumer card has (99 KB per block on sm_86 / sm_89 / sm_120, against 227 KB on the H100), fails or slows
down only on that card.

So this module runs the real host code of a layer (``lora_linear`` forward and backward, the loss)
on CPU tensors with every kernel launch recorded instead of run, then compiles each recorded launch,
in every autotune candidate, for a chosen architecture with Triton's own compiler and the ptxas that
ships in the Triton wheel, and reads back what the binary needs: shared memory, registers, spilled
bytes and the tensor-core instructions in its SASS. Nothing is timed here (that needs the GPU:
benchmarks/bench_kernels.py); ``benchmarks/compile_report.py`` prints the table for the real model
shapes and ``tests/kernels/test_kernels_aot.py`` checks a small set in CI.

Must run with ``TRITON_INTERPRET=0`` (``triton.jit`` decides at import time whether a kernel is
interpreted); the tests start it in a subprocess for that reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import subprocess
import tempfile
from typing import Callable, Iterator, List, Optional

from .utils import HAS_TRITON, is_interpret, tl, triton


@dataclasses.dataclass(frozen=True)
class Target:
    cap: int  # compute capability, major*10 + minor
    smem: int  # bytes of shared memory one block may use (the opt-in maximum in the CUDA programming guide)
    sms: int  # multiprocessors of the example card (the split-K planner sizes the grid with it)
    example: str


TARGETS = {
    # below the kernels' MIN_CAPABILITY: compiled only to show why they do not run there
    "sm_75": Target(75, 65536, 40, "T4 / RTX 2080 Ti"),
    "sm_80": Target(80, 166912, 108, "A100"),
    "sm_86": Target(86, 101376, 82, "RTX 3090"),
    "sm_89": Target(89, 101376, 128, "RTX 4090"),
    "sm_90": Target(90, 232448, 132, "H100 SXM"),
    "sm_120": Target(120, 101376, 170, "RTX 5090"),
}


@dataclasses.dataclass
class Launch:
    """One kernel launch the host code made: the kernel object it called and its arguments."""

    label: str  # what the caller was doing (set with ``phase``)
    name: str  # module attribute the host code launched
    fn: object  # JITFunction, or an Autotuner over one
    grid: object
    args: tuple
    kwargs: dict

    def configs(self) -> list:
        """The autotune candidates this launch would time, after the autotuner's own pruning
        (``[None]`` for a plain JIT launch)."""
        cfgs = getattr(self.fn, "configs", None)
        if not cfgs:
            return [None]
        prune = getattr(self.fn, "early_config_prune", None)
        if prune is not None and len(cfgs) > 1:
            cfgs = prune(cfgs, dict(zip(self.fn.arg_names, self.args)), **self.kwargs)
        return list(cfgs)


@dataclasses.dataclass
class Compiled:
    label: str
    kernel: str
    config: dict  # block sizes, num_warps, num_stages of the candidate
    shared: int  # bytes of dynamic shared memory
    registers: int  # per thread
    spill_bytes: int  # spill stores, per thread
    mma: tuple  # tensor-core SASS opcodes, e.g. ('HGMMA.64x128x16.F32.BF16',)
    fits: bool  # shared <= the target's per-block maximum
    fma: int  # fused multiply-adds in the PTX (0 where the launch asked for enable_fp_fusion=False)
    loop: dict  # opcode counts in the K loop (``k_loop``); empty for kernels without MMAs


# modules and attribute names of every kernel handle the host code launches through
_HANDLES = {
    "lora_linear": ("_mm_main", "_mm_skinny_q", "_mm_skinny_p", "_qlora_mm_kernel", "_quant_rows_kernel",
                    "_transpose_kernel", "_scale_kernel"),
    "dopsd_loss": ("_dopsd_loss_kernel", "_scale_grad_kernel"),
}
_phase = ["-"]


@contextlib.contextmanager
def phase(label: str) -> Iterator[None]:
    """Label the launches recorded inside (e.g. "forward", "backward")."""
    old, _phase[0] = _phase[0], label
    try:
        yield
    finally:
        _phase[0] = old


class _Recorder:
    def __init__(self, name: str, fn, out: List[Launch]):
        self.name, self.fn, self.out = name, fn, out

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.out.append(Launch(_phase[0], self.name, self.fn, grid, args, kwargs))

        return launch


def record(run: Callable[[], object], target: Target) -> List[Launch]:
    """Run ``run`` (host code on meta or CPU tensors) with every kernel launch recorded, not run.

    Output buffers are never written; only the launches and their arguments matter. The split-K
    planner is told the target's multiprocessor count and FP8 weights take the software decode
    below sm_89, as they would on that card."""
    _require()
    from . import dopsd_loss, lora_linear

    mods = {"lora_linear": lora_linear, "dopsd_loss": dopsd_loss}
    launches: List[Launch] = []
    saved = [(mods[m], n, getattr(mods[m], n)) for m, names in _HANDLES.items() for n in names]
    saved += [(mod, "num_sms", mod.num_sms) for mod in mods.values()]
    soft = lora_linear.FORCE_SOFT_FP8
    try:
        for mod, name, fn in saved:
            setattr(mod, name, (lambda device: target.sms) if name == "num_sms" else _Recorder(name, fn, launches))
        lora_linear.FORCE_SOFT_FP8 = target.cap < 89  # the meta tensors say nothing about the GPU
        run()
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        lora_linear.FORCE_SOFT_FP8 = soft
    return launches


def lora_linear_step(M: int, K: int, N: int, rank: int, weight: str = "int8", act8: bool = False,
                     dtype=None) -> Callable[[], None]:
    """Host code of one LoRA linear's forward and backward on meta tensors (no memory, no compute;
    Triton sees 16-byte-aligned pointers, as from the CUDA allocator), for ``record``."""
    import torch

    from . import lora_linear as ll

    wdtype = {"int8": torch.int8, "fp8": getattr(torch, "float8_e4m3fn", None)}[weight]
    dtype = dtype or torch.bfloat16

    def run():
        x = torch.empty(M, K, dtype=dtype, device="meta")
        w_q = torch.empty(N, K, dtype=wdtype, device="meta")
        w_s = torch.empty(N, dtype=torch.float32, device="meta")
        A = torch.empty(rank, K, dtype=dtype, device="meta")
        B = torch.empty(N, rank, dtype=dtype, device="meta")
        with phase("forward"):
            y, t = ll.lora_linear_forward(x, w_q, w_s, None, A, B, 2.0, act8=act8)
        with phase("backward"):
            ll.lora_linear_backward(y, x, t, w_q, w_s, A, B, 2.0, act8=act8)

    return run


def loss_step(shape=(1, 16, 128, 128)) -> Callable[[], None]:
    """Host code of the D-OPSD loss (x0-weighted) and its backward scaling, on meta tensors."""
    import torch

    from . import dopsd_loss as dl

    def run():
        v = torch.empty(*shape, dtype=torch.bfloat16, device="meta")
        with phase("loss"):
            _, grad = dl.dopsd_loss_forward(v, v, torch.empty(shape[0], device="meta"), need_grad=True)
            dl.scale_grad(grad, torch.empty((), device="meta"))

    return run


@triton.jit
def _plain_int8_gemm(a_ptr, b_ptr, c_ptr, M, N, K,
                     BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """The textbook Triton int8 GEMM, c = a · bᵀ with a [M, K] and b [N, K] contiguous along K and K a
    multiple of BLOCK_R: what Triton itself issues per K step for a tile, the baseline for ours."""
    rm = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    rn = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rk = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.int32)
    for k in range(0, K, BLOCK_R):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + rn[None, :] * K + (k + rk)[:, None])
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # Triton <= 3.6 asserts acc's dtype == out_dtype (fp32 default)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def plain_int8_gemm(M: int, N: int, K: int, config: dict) -> Launch:
    """A launch of ``_plain_int8_gemm`` (meta tensors) in the tile of ``config`` (BLOCK_P, BLOCK_Q,
    BLOCK_R, num_warps, num_stages, as in ``Compiled.config``), for ``compile_launch``."""
    import torch

    a = torch.empty(M, K, dtype=torch.int8, device="meta")
    b = torch.empty(N, K, dtype=torch.int8, device="meta")
    c = torch.empty(M, N, dtype=torch.int32, device="meta")
    kw = {k: config[k] for k in ("BLOCK_P", "BLOCK_Q", "BLOCK_R", "num_warps", "num_stages")}
    return Launch("baseline", "_plain_int8_gemm", _plain_int8_gemm, (1, 1), (a, b, c, M, N, K), kw)


class _TargetDriver:
    """Stands in for the CUDA driver: Triton asks it only for the target (and a device key)."""

    def __init__(self, target: Target):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", target.cap, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"aot-sm{self.target.arch}"  # keeps each target's kernel cache apart

    def get_current_stream(self, device=None):
        return 0


def shown_config(kwargs: dict) -> dict:
    """The fields of a launch's keyword arguments that name its candidate (``Compiled.config``)."""
    return {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in ("num_warps", "num_stages")}


def ptxas_path(cap: int) -> str:
    """The ptxas Triton itself runs for compute capability ``cap``. Triton 3.3 returns (path, version),
    3.4 takes no argument, 3.5+ picks a binary by architecture; 3.4+ return a tool with ``.path``."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(cap)
    except TypeError:
        tool = get_ptxas()
    return tool[0] if isinstance(tool, tuple) else tool.path


def _ptxas_report(ptx: str, cap: int) -> tuple:
    """(registers, spill-store bytes) from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [ptxas_path(cap), "-v", f"--gpu-name={sm_arch_from_capability(cap)}", src, "-o", src + ".o"],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return regs, spills


def _sass(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(ptxas_path(90)), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def _mma_opcodes(sass: str) -> tuple:
    # HMMA / IMMA: mma.sync (sm_80+); HGMMA / IGMMA / QGMMA: Hopper wgmma (16-bit / int8 / fp8)
    return tuple(sorted(set(re.findall(r"\b([HIQ]G?MMA\.[\w.]+)", sass))))


# "/*1850*/  @!P1 LDG.E.128 R12, desc[UR6][R12.64] ;": address, predicate, opcode, operands
_INST = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")


def k_loop(sass: str) -> dict:
    """Opcode counts in the innermost loop that issues MMAs: the GEMM's K loop.

    In a pipelined GEMM that loop holds async copies (LDGSTS, or TMA) and MMAs: each tile is in
    flight while the previous ones are multiplied. A synchronous global load (LDG) there means a tile
    goes through registers and the loop waits for global memory every iteration; shared-memory
    stores (STS) mean it is written back, e.g. byte by byte after an in-register transpose."""
    insts = [(int(a, 16), op, rest) for a, pred, op, rest in _INST.findall(sass) if pred.strip() != "@!PT"]
    loops = []
    for addr, op, rest in insts:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:  # a backward branch closes a loop
            loops.append((int(target.group(1), 16), addr))
    for lo, hi in sorted(loops, key=lambda span: span[1] - span[0]):
        ops = [op for addr, op, _ in insts if lo <= addr <= hi]
        mma = sum(bool(re.fullmatch(r"[HIQ]G?MMA", op)) for op in ops)
        if mma:
            return dict(inst=len(ops), mma=mma, ldg=ops.count("LDG"), ldgsts=ops.count("LDGSTS"),
                        lds=ops.count("LDS") + ops.count("LDSM"), sts=ops.count("STS"))
    return {}


def compile_launch(launch: Launch, target: Target, configs: Optional[list] = None) -> List[Compiled]:
    """Compile ``launch`` for ``target`` in each of ``configs`` (default: every candidate it would time)."""
    _require()
    driver = triton.runtime.driver
    # not `driver.active`: from Triton 3.4 on it builds the real driver, which needs a GPU; 3.4+ keep
    # the unbuilt one in `_active`, 3.3 keeps a lazy proxy in `active`
    old = driver.__dict__["_active"] if "_active" in driver.__dict__ else driver.active
    driver.set_active(_TargetDriver(target))
    out = []
    try:
        for cfg in launch.configs() if configs is None else configs:
            kw = dict(launch.kwargs)
            if cfg is not None:
                kw.update(cfg.all_kwargs())
                fn = launch.fn.fn  # the autotuner's inner (heuristics -> jit) chain
            else:
                fn = launch.fn
            # what `warmup` does from Triton 3.4 on; 3.3's heuristics wrapper has no `warmup`
            ck = fn.run(*launch.args, grid=launch.grid, warmup=True, **kw)
            regs, spills, mma, loop = _binary(ck.asm["ptx"], ck.asm["cubin"], target.cap)
            out.append(Compiled(launch.label, launch.name, shown_config(kw), ck.metadata.shared, regs, spills,
                                mma, ck.metadata.shared <= target.smem,
                                len(re.findall(r"\bfma\.rn", ck.asm["ptx"])), loop))
    finally:
        driver.set_active(old)
    return out


# an mma.sync or wgmma instruction in PTX; without one there is no tensor-core instruction in the SASS
_PTX_MMA = re.compile(r"\b(?:mma\.sync|wgmma\.mma_async)\b")
_BINARIES: dict = {}


def _binary(ptx: str, cubin: bytes, cap: int) -> tuple:
    """(registers, spill-store bytes, tensor-core opcodes, K-loop counts) of one compiled kernel.

    Read once per binary: the host code launches some kernels identically in several modes (the dA /
    dB reductions), and each call of ptxas or cuobjdump has a start-up cost however small the kernel.
    The SASS is disassembled only when the PTX multiplies on tensor cores: ptxas makes no MMA of
    anything else, so a kernel without one has no MMA and no K loop (``k_loop``) either."""
    key = (cap, hashlib.sha256(cubin).digest())
    if key not in _BINARIES:
        regs, spills = _ptxas_report(ptx, cap)
        sass = _sass(cubin) if _PTX_MMA.search(ptx) else ""
        _BINARIES[key] = (regs, spills, _mma_opcodes(sass), k_loop(sass))
    return _BINARIES[key]


def _require() -> None:
    if not HAS_TRITON:
        raise RuntimeError("kernels.aot needs Triton (pip install 'lowvram-dopsd[kernels]')")
    if is_interpret():
        raise RuntimeError("kernels.aot compiles real kernels: run it with TRITON_INTERPRET=0 "
                           "(triton.jit decides at import time whether a kernel is interpreted)")
