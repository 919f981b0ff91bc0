"""Regional compilation against eager, numerically: one trained roll-out state of a tiny model, compiled blocks
(`accel.compile_blocks`, any dynamo backend) against the same model eager.

    python benchmarks/compile_parity.py --backend inductor --out benchmarks/results        # CPU: minutes
    python benchmarks/compile_parity.py --backend inductor --device cuda --out DIR           # a GPU: seconds

For each family (the tiny Z-Image and klein of lowvram_dopsd/tiny.py, 8-bit base on the fused kernel's path,
checkpointing on): the teacher's velocity (no grad), the student's, and the LoRA gradients of the student's
loss, eager and compiled, and their largest differences; compile time and graphs. Writes
compile-parity-<device>-<backend>.md/.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_state(family, model, lora, x, sigma, c_s, c_t):
    import torch

    with torch.no_grad(), lora.use("teacher"):
        v_t = family.velocity(model, x, sigma, c_t)
    with lora.use("student"):
        v_s = family.velocity(model, x, sigma, c_s)
        (v_s - v_t).pow(2).mean().backward()
    grads = [p.grad.clone() for p in lora.student_parameters()]
    for p in lora.student_parameters():
        p.grad = None
    return v_t.float(), v_s.detach().float(), grads


def compare(make, name: str, device: str, backend: str) -> dict:
    import torch

    from lowvram_dopsd import accel
    from lowvram_dopsd.config import load_config
    from lowvram_dopsd.families import load_family
    from lowvram_dopsd.lora import DualLoRA

    with tempfile.TemporaryDirectory() as tmp:
        folder = make(Path(tmp) / name)
        family = load_family(str(folder))
        cfg = load_config("cpu-demo", {"quant": "qint8", "grad_checkpointing": True, "device": device})
        dev = torch.device(device)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        model = family.load_transformer(cfg, dev, dtype)
        lora = DualLoRA.attach(model, family.lora_targets, cfg.rank, cfg.alpha, seed=0)
        lora.enable_fused_kernels("off", kernels="auto" if dev.type == "cuda" else "off")
        with torch.no_grad():
            for layer in lora.layers.values():
                layer.student_B.normal_(std=0.05)
                layer.teacher_B.normal_(std=0.05)
        c_s, c_t = family.random_conditions(family.teachers[0], cfg, dev, dtype)
        x = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(0)).to(dev)
        sigma = family.sigmas(64, 64, 2)[0].to(dev)
        eager = one_state(family, model, lora, x, sigma, [c_s], [c_t])
        torch._dynamo.reset()
        blocks = accel.compile_blocks(model, backend)
        start = accel.compiled_graphs()
        t0 = time.perf_counter()
        compiled = one_state(family, model, lora, x, sigma, [c_s], [c_t])
        seconds = time.perf_counter() - t0

    def diff(a, b) -> dict:
        return {"max_abs": float((a - b).abs().max()), "max_rel": float((a - b).abs().max() / b.abs().max())}
    grads = [diff(a, b) for a, b in zip(compiled[2], eager[2])]
    return {"family": family.name, "dtype": str(dtype), "blocks": blocks, "graphs": accel.compiled_graphs() - start,
            "compile_seconds": seconds, "teacher": diff(compiled[0], eager[0]), "student": diff(compiled[1], eager[1]),
            "grads": {"max_abs": max(g["max_abs"] for g in grads), "max_rel": max(g["max_rel"] for g in grads)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    import torch

    from lowvram_dopsd.tiny import make_tiny_klein, make_tiny_zimage

    torch.set_num_threads(1)
    rows = [compare(make_tiny_zimage, "zimage", args.device, args.backend),
            compare(make_tiny_klein, "klein", args.device, args.backend)]
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else (platform.processor() or "cpu")
    meta = {"device": device, "backend": args.backend, "torch": torch.__version__,
            "command": "python benchmarks/compile_parity.py " + " ".join(sys.argv[1:])}
    lines = [f"# Compiled blocks against eager: {device}, backend {args.backend}", "",
             f"`{meta['command']}` (torch {torch.__version__}). One trained state of the tiny model (8-bit base on the "
             "fused kernel's path, checkpointing, LoRA rank 4 with non-zero student and teacher sets): the largest "
             "differences between compiled and eager, relative to the largest eager value.", "",
             "| model | dtype | blocks | graphs | compile + first state s | teacher v | student v | LoRA grads |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['dtype']} | {r['blocks']} | {r['graphs']} | {r['compile_seconds']:.0f} "
                     f"| {r['teacher']['max_rel']:.1e} | {r['student']['max_rel']:.1e} | {r['grads']['max_rel']:.1e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compile-parity-{'cuda' if args.device == 'cuda' else 'cpu'}-{args.backend}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
