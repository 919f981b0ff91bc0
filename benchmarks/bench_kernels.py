"""Benchmark the Triton kernels against the usual PEFT setups, on real DiT shapes (needs a CUDA GPU).

LoRA linear, forward (no_grad: the teacher pass) and forward+backward (x and the LoRA factors
need gradients, the base is frozen), at M = 4096 image + 512 text tokens (1024² images):

  ours-int8 / ours-fp8     lowvram_dopsd.kernels.lora_linear (dequant fused into the GEMM tiles)
  ours-int8-act8           the same with act_quant="int8": int8 x int8 base GEMMs on per-token
                           quantised activations (forward and dx); its error columns then include
                           the activation rounding (~0.5 % on this Gaussian data)
  quanto-qint8 / -qfloat8  peft LoRA on an optimum-quanto QLinear (qint8 / qfloat8 weights)
  bnb-int8                 peft LoRA on a bitsandbytes Linear8bitLt (LLM.int8, threshold 6.0)
  bf16                     peft LoRA on a plain bf16 nn.Linear (cuBLAS)

D-OPSD loss: our one-pass kernel vs plain torch, and its bandwidth vs a device-to-device copy.

Shapes (published transformer configs):
  Z-Image-Turbo: dim 3840, FFN hidden int(3840/3*8) = 10240 (SwiGLU w1/w3/w2), 30 layers, separate
    to_q/to_k/to_v/to_out (Tongyi-MAI/Z-Image-Turbo transformer/config.json: dim 3840, n_layers 30,
    n_heads 30; FeedForward(dim, hidden_dim=int(dim / 3 * 8)) in diffusers' transformer_z_image.py).
  FLUX.2-klein-4B: dim 24 heads x 128 = 3072, mlp_ratio 3 (9216, SwiGLU), 5 double + 20 single
    blocks (black-forest-labs FLUX.2-klein-4B transformer/config.json: num_attention_heads 24,
    attention_head_dim 128, mlp_ratio 3.0, num_layers 5, num_single_layers 20); single blocks fuse
    to_qkv_mlp_proj 3072 -> 3*3072 + 2*9216 = 27648 and to_out 3072 + 9216 = 12288 -> 3072
    (diffusers transformer_flux2.py).

Usage: python benchmarks/bench_kernels.py [--shapes zimage,klein] [--methods ...] [--breakdown]
       [--out benchmarks/results]
       python benchmarks/bench_kernels.py --tiny --out /tmp/r    # CPU smoke test of this script
Timings: triton.testing.do_bench medians (CUDA events) after warm-up, random data.

--tiny runs every method and report path on the CPU at tiny shapes (our kernels through the Triton
interpreter when TRITON_INTERPRET=1, else their torch reference: each row says which ran). It checks
the script, not speed: a GPU session is rare and should not find this script broken.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import traceback

import torch

try:
    import triton
    from triton.testing import do_bench
except ImportError:  # pragma: no cover
    sys.exit("bench_kernels.py needs triton and a CUDA GPU")

import lowvram_dopsd.kernels.lora_linear as ll
from lowvram_dopsd.kernels import DISPATCH_COUNTS
from lowvram_dopsd.kernels.dopsd_loss import dopsd_loss, dopsd_loss_reference

TOKENS = 4096 + 512
DEV = "cuda"  # --tiny: "cpu"
SHAPES = {
    # name: (K in, N out, uses per model step)
    "zimage": [
        ("attn q/k/v/out 3840->3840", 3840, 3840, 4 * 30),
        ("ffn w1/w3 3840->10240", 3840, 10240, 2 * 30),
        ("ffn w2 10240->3840", 10240, 3840, 1 * 30),
    ],
    "klein": [
        # double blocks: image (4096 tok) + text (512 tok) streams have separate weights; counted
        # once at 4608 tokens (same FLOPs, one launch instead of two)
        ("attn q/k/v/out 3072->3072", 3072, 3072, 4 * 5),
        ("ff in 3072->18432", 3072, 18432, 1 * 5),
        ("ff out 9216->3072", 9216, 3072, 1 * 5),
        ("single qkv+mlp 3072->27648", 3072, 27648, 20),
        ("single out 12288->3072", 12288, 3072, 20),
    ],
}
# --tiny: odd sizes (not multiples of any block), one shape per kind of launch the real ones make
TINY_TOKENS = 40
TINY_SHAPES = [("tiny square 96->96", 96, 96, 4), ("tiny up 96->160", 96, 160, 2), ("tiny down 160->96", 160, 96, 1)]
ALL_METHODS = ["ours-int8", "ours-int8-act8", "ours-fp8", "quanto-qint8", "quanto-qfloat8", "bnb-int8", "bf16"]


def bench_ms(fn, grad_to_none=None, warmup=10, rep=50):
    if DEV == "cpu":  # --tiny: one call's wall clock (do_bench needs CUDA events; nothing to read here)
        import time

        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def graph_ms(fn, grad_to_none=None):
    """GPU time alone: fn captured in a CUDA graph and replayed (no Python / launch overhead)."""
    if DEV == "cpu":
        return "n/a (cpu)"
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=30, grad_to_none=grad_to_none, return_mode="median")
    except Exception as e:  # noqa: BLE001 - e.g. a library that syncs inside fn
        return f"n/a ({type(e).__name__})"


def host_ms(fn, n=20):
    """CPU time to enqueue one call (GPU not waited for, unless fn itself syncs)."""
    import time

    if DEV == "cpu":
        return bench_ms(fn)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def peak_extra_mb(fn):
    if DEV == "cpu":
        return "n/a (cpu)"
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------------
# the PEFT baselines
# ---------------------------------------------------------------------------------------------
class _Wrap(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _peft(base: torch.nn.Module, rank: int, alpha: float, A: torch.Tensor, B: torch.Tensor):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0)
    model = get_peft_model(_Wrap(base), cfg, autocast_adapter_dtype=False)
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.data = A.detach().clone()
            p.requires_grad_(True)
        elif "lora_B" in n:
            p.data = B.detach().clone()
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
    return model


def build_method(method, w, w_q8, s8, w_f8, sf8, A, B, rank, alpha):
    """Returns (forward callable x -> y, list of LoRA params that get grads)."""
    scale = alpha / rank
    K, N = w.shape[1], w.shape[0]
    if method.startswith("ours"):
        wq, ws = (w_f8, sf8) if method == "ours-fp8" else (w_q8, s8)
        act = "int8" if method.endswith("-act8") else "off"
        Ap, Bp = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
        return (lambda x: ll.lora_linear(x, wq, ws, None, Ap, Bp, scale, act_quant=act)), [Ap, Bp]
    if method == "bf16":
        lin = torch.nn.utils.skip_init(torch.nn.Linear, K, N, bias=False, device=DEV, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        m = _peft(lin, rank, alpha, A, B)
    elif method.startswith("quanto"):
        import optimum.quanto.library.extensions as qext
        from optimum.quanto import freeze, qfloat8, qint8, quantize
        import optimum.quanto.tensor.weights.qbytes as qb

        # no JIT build of quanto's CUDA extension (Marlin FP8) inside a short lease: quanto then
        # runs its generic path (dequantise the weight, torch.matmul)
        qext.is_extension_available = lambda name: False
        qb.is_extension_available = lambda name: False
        lin = torch.nn.utils.skip_init(torch.nn.Linear, K, N, bias=False, device=DEV, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        wrap = _Wrap(lin)
        quantize(wrap, weights=qint8 if method == "quanto-qint8" else qfloat8)
        freeze(wrap)
        m = _peft(wrap.lin, rank, alpha, A, B)
    elif method == "bnb-int8":
        import bitsandbytes as bnb

        lin = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=6.0)
        lin.weight = bnb.nn.Int8Params(w.detach().cpu().clone(), requires_grad=False, has_fp16_weights=False)
        lin = lin.to(DEV)  # Int8Params quantises on the move (CPU included)
        m = _peft(lin, rank, alpha, A, B)
    else:
        raise ValueError(method)
    params = [p for p in m.parameters() if p.requires_grad]
    return m, params


def ours_breakdown(x, dy, w_q, w_s, A, B, s, act8=False):
    """GPU time of each launch of our forward / backward (CUDA graphs over subsets of the work)."""
    _, t = ll.lora_linear_forward(x, w_q, w_s, None, A, B, s, act8=act8)

    def bwd(dx, dA, dB):
        return lambda: ll.lora_linear_backward(dy, x, t, w_q, w_s, A, B, s, dx, dA, dB, act8=act8)

    fwd = graph_ms(lambda: ll.lora_linear_forward(x, w_q, w_s, None, A, B, s, act8=act8))
    t_all, t_dx, t_dA, t_dB = (graph_ms(bwd(*f)) for f in ((1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)))
    try:
        dA = t_all - t_dx - t_dB
        u = t_dA - dA
        return dict(fwd=fwd, bwd=t_all, u=u, dx=t_dx - u, dA=dA, dB=t_dB)
    except TypeError:
        return dict(fwd=fwd, bwd=t_all)


def bench_lora(shapes, methods, rank, alpha, log, breakdown=False):
    rows = []
    g = torch.Generator(device=DEV).manual_seed(0)
    for family in shapes:
        for name, K, N, count in SHAPES[family]:
            w = (torch.randn(N, K, device=DEV, generator=g) * 0.02).to(torch.bfloat16)
            w_q8, s8 = ll.quantize_weight(w, "int8")
            w_f8, sf8 = ll.quantize_weight(w, "fp8")
            A = (torch.randn(rank, K, device=DEV, generator=g) * 0.01).to(torch.bfloat16)
            B = (torch.randn(N, rank, device=DEV, generator=g) * 0.01).to(torch.bfloat16)
            x = torch.randn(TOKENS, K, device=DEV, generator=g).to(torch.bfloat16)
            dy = torch.randn(TOKENS, N, device=DEV, generator=g).to(torch.bfloat16)
            flops_fwd = 2 * TOKENS * K * N
            for method in methods:
                row = dict(family=family, shape=name, K=K, N=N, M=TOKENS, count=count, method=method)
                try:
                    f, params = build_method(method, w, w_q8, s8, w_f8, sf8, A, B, rank, alpha)
                    xg = x.detach().clone().requires_grad_()

                    def fwd():
                        with torch.no_grad():
                            return f(x)

                    def fwd_bwd():
                        f(xg).backward(dy)

                    before = dict(DISPATCH_COUNTS)
                    y = fwd()
                    if method.startswith("ours"):  # which implementation this row timed
                        ran = [k.split(".")[1] for k, n in DISPATCH_COUNTS.items()
                               if k.startswith("lora_linear.") and n > before.get(k, 0)]
                        row["ran"] = ",".join(ran)
                    # fp32 reference on the same (quantised) base the method uses
                    if method == "bf16":
                        wq_ref, s_ref = w, torch.ones(N, device=DEV)
                    elif "fp8" in method or "qfloat8" in method:
                        wq_ref, s_ref = w_f8, sf8
                    else:
                        wq_ref, s_ref = w_q8, s8
                    ref = ll.lora_linear_reference(x.float(), wq_ref, s_ref, None, A.float(), B.float(), alpha / rank)
                    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
                    row["rel_err_vs_fp32_ref"] = rel(y, ref)
                    y = ref = None
                    fwd_bwd()  # warm-up / autotune outside the timed region
                    if method.startswith("ours"):  # gradients too, with the autotuned configs
                        xr = x.float().requires_grad_()
                        Ar, Br = A.float().requires_grad_(), B.float().requires_grad_()
                        ll.lora_linear_reference(xr, wq_ref, s_ref, None, Ar, Br, alpha / rank).backward(dy.float())
                        for p_ in [xg] + params:
                            p_.grad = None
                        fwd_bwd()
                        row["rel_err_dx"] = rel(xg.grad, xr.grad)
                        row["rel_err_dA"] = rel(params[0].grad, Ar.grad)
                        row["rel_err_dB"] = rel(params[1].grad, Br.grad)
                        xr = Ar = Br = None
                    row["fwd_ms"] = bench_ms(fwd)
                    row["fwd_bwd_ms"] = bench_ms(fwd_bwd, grad_to_none=[xg] + params)
                    row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
                    row["fwd_bwd_tflops"] = 2 * flops_fwd / row["fwd_bwd_ms"] / 1e9  # base GEMMs only
                    # bitsandbytes syncs inside its autograd function: a CUDA-graph capture fails and
                    # leaves the RNG in capture state, so it is not attempted
                    row["fwd_bwd_graph_ms"] = ("n/a (syncs)" if method.startswith("bnb")
                                               else graph_ms(fwd_bwd, grad_to_none=[xg] + params))
                    row["fwd_bwd_host_ms"] = host_ms(fwd_bwd)
                    row["peak_extra_mb_fwd_bwd"] = peak_extra_mb(fwd_bwd)
                    if method.startswith("ours") and breakdown:
                        row["bwd_breakdown_graph_ms"] = ours_breakdown(x, dy, wq_ref, s_ref, A, B, alpha / rank,
                                                                       act8=method.endswith("-act8"))
                except Exception as e:  # a baseline that does not run here is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    log(traceback.format_exc(limit=3))
                if DEV == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                log(_fmt_row(row))
    return rows


def _num(v, fmt=".3f"):
    return format(v, fmt) if isinstance(v, float) else str(v)


def _fmt_row(r):
    if "error" in r:
        return f"{r['shape']:<28} {r['method']:<18} ERROR {r['error']}"
    g = r.get("fwd_bwd_graph_ms")
    g = f"{g:7.3f}" if isinstance(g, float) else str(g)
    bd = r.get("bwd_breakdown_graph_ms")
    bd = (" [" + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in bd.items()) + "]") if bd else ""
    ran = f" (ran: {r['ran']})" if r.get("ran", "triton") != "triton" else ""
    return (f"{r['shape']:<28} {r['method'] + ran:<18} fwd {r['fwd_ms']:7.3f} ms  fwd+bwd {r['fwd_bwd_ms']:7.3f} ms  "
            f"graph {g}  host {r['fwd_bwd_host_ms']:6.3f}{bd}  "
            f"({r['fwd_tflops']:5.0f} / {r['fwd_bwd_tflops']:5.0f} TFLOP/s)  +{_num(r['peak_extra_mb_fwd_bwd'], '6.0f')} MB  "
            f"err y {r['rel_err_vs_fp32_ref']:.1e}"
            + (f" dx {r['rel_err_dx']:.1e} dA {r['rel_err_dA']:.1e} dB {r['rel_err_dB']:.1e}" if "rel_err_dx" in r else ""))


# ---------------------------------------------------------------------------------------------
# parallel pre-compilation: Triton's autotuner compiles its candidates one after another; worker
# processes compile one candidate each (same specialisations: every benchmarked dim is a multiple
# of 128) into Triton's on-disk cache, so the timed process only benchmarks them.
# ---------------------------------------------------------------------------------------------
def _precompile_worker(task):
    i, fmts = task
    import lowvram_dopsd.kernels.lora_linear as L

    pick = lambda cfgs: [cfgs[i % len(cfgs)]]  # noqa: E731
    L._mm_main = L._autotuned(pick(L._main_configs()))
    L._mm_skinny_q = L._autotuned(pick(L._skinny_q_configs()))
    L._mm_skinny_p = L._autotuned(pick(L._skinny_p_configs()))
    M, K, N, r = 512, 256, 384, 64
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, K, device="cuda") * 0.01).to(torch.bfloat16).requires_grad_()
    B = (torch.randn(N, r, device="cuda") * 0.01).to(torch.bfloat16).requires_grad_()
    for fmt, act in fmts:
        w_q, w_s = L.quantize_weight(torch.randn(N, K, device="cuda"), fmt)
        y = L.lora_linear(x, w_q, w_s, None, A, B, 2.0, act_quant=act)
        y.backward(torch.randn(M, N, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    return i


def precompile(fmts, log):
    import multiprocessing as mp
    import time

    n = max(len(ll._main_configs()), len(ll._skinny_q_configs()), len(ll._skinny_p_configs()))
    t0 = time.time()
    with mp.get_context("spawn").Pool(n) as pool:
        pool.map(_precompile_worker, [(i, fmts) for i in range(n)])
    log(f"pre-compiled {n} candidate configs per kernel in {time.time() - t0:.1f} s")


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------
def bench_loss(log, tiny=False):
    out = {}
    nbytes = (1 if tiny else 512) * 2**20
    src = torch.randn(nbytes // 2, device=DEV).to(torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench_ms(lambda: dst.copy_(src))
    out["copy_GBps"] = 2 * nbytes / t / 1e6
    log(f"device-to-device copy: {out['copy_GBps']:.0f} GB/s (read + write, {nbytes >> 20} MiB)")
    shapes = ((("odd", (3, 1000)), ("latent 1x16x8x8", (1, 16, 8, 8))) if tiny else
              (("large", (4, 32 * 2**20)), ("latent 1x16x128x128", (1, 16, 128, 128))))
    for label, shape in shapes:
        v_s = torch.randn(shape, device=DEV).to(torch.bfloat16).requires_grad_()
        v_t = torch.randn(shape, device=DEV).to(torch.bfloat16)
        w = torch.rand(shape[0], device=DEV) + 0.1
        e = v_s.numel() * 2  # bytes per tensor

        def ours_fwd():
            return dopsd_loss(v_s, v_t, w)  # computes and stores d loss / d v_s

        def ours_fb():
            dopsd_loss(v_s, v_t, w).backward()

        def ref_fb():
            dopsd_loss_reference(v_s, v_t, w).backward()

        r = dict(shape=list(shape), elements=v_s.numel())
        r["ours_fwd_ms"] = bench_ms(ours_fwd, grad_to_none=[v_s])
        r["ours_fwd_bwd_ms"] = bench_ms(ours_fb, grad_to_none=[v_s])
        r["torch_fwd_bwd_ms"] = bench_ms(ref_fb, grad_to_none=[v_s])
        r["ours_fwd_graph_ms"] = graph_ms(ours_fwd, grad_to_none=[v_s])
        r["ours_fwd_bwd_graph_ms"] = graph_ms(ours_fb, grad_to_none=[v_s])
        r["torch_fwd_bwd_graph_ms"] = graph_ms(ref_fb, grad_to_none=[v_s])
        r["ours_fwd_GBps"] = 3 * e / r["ours_fwd_ms"] / 1e6  # read v_s, v_t; write grad
        r["ours_fwd_bwd_GBps"] = 5 * e / r["ours_fwd_bwd_ms"] / 1e6  # + backward: read grad, write grad
        r["fwd_frac_of_copy"] = r["ours_fwd_GBps"] / out["copy_GBps"]
        out[label] = r
        log(f"loss {label}: ours fwd {r['ours_fwd_ms']*1e3:.1f} us ({r['ours_fwd_GBps']:.0f} GB/s, "
            f"{100*r['fwd_frac_of_copy']:.0f}% of copy), ours fwd+bwd {r['ours_fwd_bwd_ms']*1e3:.1f} us, "
            f"torch fwd+bwd {r['torch_fwd_bwd_ms']*1e3:.1f} us; CUDA graph: ours fwd {r['ours_fwd_graph_ms']}, "
            f"ours fwd+bwd {r['ours_fwd_bwd_graph_ms']}, torch fwd+bwd {r['torch_fwd_bwd_graph_ms']} ms")
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def device_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower())).lower()


def write_report(meta, rows, loss, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    slug = device_slug(meta["device"])
    with open(os.path.join(out_dir, f"kernels-{slug}.json"), "w") as f:
        json.dump(dict(meta=meta, lora_linear=rows, loss=loss), f, indent=1)
    L = [f"# Kernel benchmarks: {meta['device']}", ""]
    L += [f"- date: {meta['date']}", f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
          f"- command: `{meta['command']}`",
          f"- M = {TOKENS} tokens " + ("(4096 image + 512 text, 1024²), " if DEV == "cuda" else
                                       "(--tiny: a CPU smoke test of this script; its times mean nothing), ")
          + f"LoRA rank {meta['rank']}, alpha {meta['alpha']}, bf16 activations; "
          "times are do_bench medians in ms; fwd under no_grad, fwd+bwd with grads for x and LoRA", ""]
    L += ["## LoRA linear", "",
          "eager = `do_bench` of the Python call (what an eager training step sees, host overhead "
          "included); graph = the same fwd+bwd captured in a CUDA graph and replayed (GPU time only); "
          "host = CPU time to enqueue one fwd+bwd.", "",
          "| shape | method | fwd ms | fwd+bwd ms eager | vs bf16 | fwd+bwd ms graph | vs bf16 | host ms | "
          "fwd TFLOP/s | extra peak MB |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ok = [r for r in rows if "error" not in r]
    base = {r["shape"]: r for r in ok if r["method"] == "bf16"}

    def ratio(r, k):
        b = base.get(r["shape"], {}).get(k)
        v = r.get(k)
        return f"{v / b:.2f}x" if isinstance(v, float) and isinstance(b, float) else "-"

    num = _num

    for r in rows:
        if "error" in r:
            L.append(f"| {r['shape']} | {r['method']} | error: {r['error'][:120]} | | | | | | | |")
            continue
        method = r["method"] + (f" (ran: {r['ran']})" if r.get("ran", "triton") != "triton" else "")
        L.append(f"| {r['shape']} | {method} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                 f"{ratio(r, 'fwd_bwd_ms')} | {num(r['fwd_bwd_graph_ms'])} | {ratio(r, 'fwd_bwd_graph_ms')} | "
                 f"{r['fwd_bwd_host_ms']:.2f} | {r['fwd_tflops']:.0f} | {num(r['peak_extra_mb_fwd_bwd'], '.0f')} |")
    bd = [r for r in ok if r.get("bwd_breakdown_graph_ms")]
    if bd:
        L += ["", "Per launch (CUDA-graph GPU ms; u, dx, dA, dB derived from graphs of subsets of the backward, "
              "so small entries carry ~10 us noise; dx includes dequantising the weight):", "",
              "| shape | method | fwd (t + y) | bwd | u = dy·B | dx | dA | dB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in bd:
            b = r["bwd_breakdown_graph_ms"]
            L.append(f"| {r['shape']} | {r['method']} | " + " | ".join(num(b.get(k, "-")) for k in
                                                                      ("fwd", "bwd", "u", "dx", "dA", "dB")) + " |")
    # per-model-step totals
    L += ["", "### Per model step (Σ uses × time over the LoRA'd linears of the transformer blocks)", "",
          "| model | method | fwd ms | fwd+bwd ms eager | fwd+bwd ms graph |", "| --- | --- | ---: | ---: | ---: |"]
    for fam in sorted({r["family"] for r in rows}):
        for m in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["family"] == fam and r["method"] == m]
            if not rs or any("error" in r for r in rs):
                continue
            gsum = (f"{sum(r['count'] * r['fwd_bwd_graph_ms'] for r in rs):.1f}"
                    if all(isinstance(r["fwd_bwd_graph_ms"], float) for r in rs) else "-")
            L.append(f"| {fam} | {m} | {sum(r['count'] * r['fwd_ms'] for r in rs):.1f} | "
                     f"{sum(r['count'] * r['fwd_bwd_ms'] for r in rs):.1f} | {gsum} |")
    if loss:
        L += ["", "## D-OPSD loss (bf16, weighted)", "", f"Device-to-device copy: {loss['copy_GBps']:.0f} GB/s "
              "(bytes read + written).", "",
              "| size | ours fwd (loss + grad), eager | GB/s | % of copy | ours fwd graph | ours fwd+bwd eager | "
              "ours fwd+bwd graph | torch fwd+bwd eager | torch fwd+bwd graph |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for k, r in loss.items():
            if not isinstance(r, dict):
                continue
            us = lambda v: f"{v * 1e3:.1f} us" if isinstance(v, float) else str(v)  # noqa: E731
            L.append(f"| {k} {r['shape']} | {us(r['ours_fwd_ms'])} | {r['ours_fwd_GBps']:.0f} | "
                     f"{100*r['fwd_frac_of_copy']:.0f}% | {us(r['ours_fwd_graph_ms'])} | {us(r['ours_fwd_bwd_ms'])} | "
                     f"{us(r['ours_fwd_bwd_graph_ms'])} | {us(r['torch_fwd_bwd_ms'])} | "
                     f"{us(r['torch_fwd_bwd_graph_ms'])} |")
    with open(os.path.join(out_dir, f"kernels-{slug}.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    return slug


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="zimage,klein")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=128.0)
    ap.add_argument("--no-loss", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also time each launch of ours (CUDA graphs)")
    ap.add_argument("--no-precompile", dest="precompile", action="store_false",
                    help="skip compiling the autotuning candidates in parallel worker processes first")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke test of this script at tiny shapes (no timing worth reading)")
    args = ap.parse_args(argv)
    global DEV, TOKENS
    if args.tiny:
        DEV, TOKENS, SHAPES["tiny"], args.shapes, args.precompile = "cpu", TINY_TOKENS, TINY_SHAPES, "tiny", False
    elif not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (or --tiny for its CPU smoke test)")

    def log(s):
        print(s, flush=True)

    meta = dict(
        device="cpu-tiny" if args.tiny else torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, triton_interpret=os.environ.get("TRITON_INTERPRET", "0"),
        cuda=torch.version.cuda, python=platform.python_version(), rank=args.rank, alpha=args.alpha,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:])),
    )
    for mod in ("peft", "bitsandbytes", "optimum.quanto"):
        try:
            meta[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as e:  # noqa: BLE001
            meta[mod] = f"unavailable ({type(e).__name__}: {e})"[:200]
    log(json.dumps(meta))
    fmts = [(f, a) for f, a, m in (("int8", "off", "ours-int8"), ("int8", "int8", "ours-int8-act8"),
                                   ("fp8", "off", "ours-fp8")) if m in args.methods.split(",")]
    if args.precompile and fmts:
        try:
            precompile(fmts, log)
        except Exception:  # noqa: BLE001 - the timed run compiles whatever is missing
            log("pre-compilation failed:\n" + traceback.format_exc(limit=3))
    rows = bench_lora(args.shapes.split(","), args.methods.split(","), args.rank, args.alpha, log,
                      breakdown=args.breakdown)
    loss = {}
    if not args.no_loss:
        try:
            loss = bench_loss(log, tiny=args.tiny)
        except Exception:  # noqa: BLE001 - still write the LoRA results
            log("loss benchmark failed:\n" + traceback.format_exc(limit=4))
    meta["tuned_configs"] = {repr(k): v for k, v in ll._BEST_CONFIG.items() if isinstance(k[1], int) and k[1] >= 1024}
    slug = write_report(meta, rows, loss, args.out)
    log(f"wrote {args.out}/kernels-{slug}.md/.json")


if __name__ == "__main__":
    main()
