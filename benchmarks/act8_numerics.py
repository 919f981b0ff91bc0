"""How much do int8 activations (act_quant = "int8") change the numbers? CPU, no GPU needed.

    python benchmarks/act8_numerics.py [--out benchmarks/results]

Both arms use the same int8 base weights (quanto qint8, per-channel); they differ only in the base
GEMMs' activations: exact (what quanto and our default kernel path multiply) or per-token int8
(forward on x, backward dx on dy ⊙ w_scale; lora_linear's torch reference, which the Triton kernel
matches at the parity tests' tolerances).

1. The trained toy DiT (lowvram_dopsd/assets/toy/model; the one trained model in the repo), 4
   blocks, D-OPSD's own quantities on a batch of 32 scenes at the 4 schedule sigmas:
   each LoRA'd linear's base output on the inputs it really sees (isolated: exact inputs to both);
   the student velocity; the D-OPSD loss; and the gradient of every student LoRA factor
   (relative error and cosine), with the LoRA B initialised non-zero so that every gradient is.
2. Synthetic rows at Z-Image's width (K = 3840, N = 3840): Gaussian activations, then with one
   outlier channel at 10 / 30 / 100 x the rest's std -- the failure mode of per-token int8 (the
   outlier sets the token's step). Real DiT activations are not available here (no weights can be
   downloaded); this shows how the error grows if they carry such channels.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lowvram_dopsd.families.toy import Toy  # noqa: E402
from lowvram_dopsd.kernels.lora_linear import lora_linear_reference, quantize_weight  # noqa: E402
from lowvram_dopsd.lora import DualLoRA  # noqa: E402
from lowvram_dopsd.quant import int8_view, quantize_frozen  # noqa: E402
from lowvram_dopsd.toy import world  # noqa: E402
from lowvram_dopsd.toy.pipeline import ToyDiTPipeline  # noqa: E402

MODEL = ROOT / "lowvram_dopsd" / "assets" / "toy" / "model"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def toy_study(batch: int, seed: int) -> dict:
    torch.manual_seed(seed)  # the LoRA A factors' init draws from the global generator
    pipe = ToyDiTPipeline.from_pretrained(MODEL)
    dit = pipe.transformer.float().eval().requires_grad_(False)
    dit_fp32 = ToyDiTPipeline.from_pretrained(MODEL).transformer.float().eval().requires_grad_(False)
    quantize_frozen(dit, "qint8", skip=Toy.quant_skip)
    lora = DualLoRA.attach(dit, Toy.lora_targets, rank=8, alpha=8.0)
    lora_fp32 = DualLoRA.attach(dit_fp32, Toy.lora_targets, rank=8, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    for layer in lora.layers.values():  # B = 0 would make dA = 0 and hide half the gradients
        layer.student_B.data.normal_(0.0, 0.02, generator=g)
    lora_fp32.load("student", {k: t.detach() for k, t in lora.tensors("student").items()})
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(batch)]
    refs = world.to_tensor([world.render(s) for s in scenes])
    with torch.no_grad():
        h_s, m_s = pipe.encode([s.caption() for s in scenes])
        h_t, m_t = pipe.encode([s.caption() for s in scenes], refs)
    x0 = refs
    noise = torch.randn(x0.shape, generator=g)
    sig = torch.as_tensor(pipe.sigmas[:-1]).float().repeat_interleave(-(-batch // 4))[:batch]  # the 4 schedule sigmas
    x = (1 - sig[:, None, None, None]) * x0 + sig[:, None, None, None] * noise

    def run(act: str, capture: dict | None = None, model=dit, lora=lora):
        if act != "fp32 base":
            lora.enable_fused_kernels(act)
        hooks = []
        if capture is not None:
            for name, layer in lora.layers.items():
                def keep(mod, inp, out, name=name):  # a hook that returns a value replaces the output
                    capture.setdefault(name, inp[0].detach().clone())
                hooks.append(layer.register_forward_hook(keep))
        for p in lora.student_parameters():
            p.grad = None
        with torch.no_grad():
            v_t = model(x, sig, h_t, m_t)
        v_s = model(x, sig, h_s, m_s)
        loss = torch.nn.functional.mse_loss(v_s, v_t)
        loss.backward()
        for h in hooks:
            h.remove()
        grads = {n: (l.student_A.grad.clone(), l.student_B.grad.clone()) for n, l in lora.layers.items()}
        return v_s.detach(), float(loss.detach()), grads

    inputs: dict = {}
    v_ex, loss_ex, g_ex = run("off", inputs)
    v_q, loss_q, g_q = run("int8")
    v_32, loss_32, g_32 = run("fp32 base", model=dit_fp32, lora=lora_fp32)
    layers = {}
    for name, layer in lora.layers.items():
        w_q, w_s = int8_view(layer.base)
        xin = inputs[name]
        zero_a = torch.zeros_like(layer.student_A)
        args = (w_q, w_s, None, zero_a, layer.student_B.detach(), 1.0)
        with torch.no_grad():
            exact = lora_linear_reference(xin, *args)
            q = lora_linear_reference(xin, *args, act_quant="int8")
        t = xin.reshape(-1, xin.shape[-1]).abs()
        layers[name] = {"base_out_rel_err": rel(q, exact),
                        "input_max_over_rms": float((t.amax(1) / t.pow(2).mean(1).sqrt().clamp_min(1e-30)).mean()),
                        "grad_A_rel_err": rel(g_q[name][0], g_ex[name][0]),
                        "grad_B_rel_err": rel(g_q[name][1], g_ex[name][1])}
    def flat(grads):
        return torch.cat([torch.cat([a.flatten(), b.flatten()]) for a, b in grads.values()])

    def compare(v, loss, grads, v_ref, loss_ref, grads_ref):
        return {"velocity_rel_err": rel(v, v_ref), "loss": loss, "loss_ref": loss_ref,
                "loss_rel_diff": abs(loss - loss_ref) / loss_ref,
                "grad_rel_err": rel(flat(grads), flat(grads_ref)), "grad_cosine": cos(flat(grads), flat(grads_ref))}

    return {"batch": batch, "seed": seed, "sigmas": [float(s) for s in pipe.sigmas[:-1]],
            # what this mode adds: int8 vs exact activations, both on the qint8 base
            "act_int8_vs_exact": compare(v_q, loss_q, g_q, v_ex, loss_ex, g_ex),
            # for scale, what users of quant = "qint8" already accept: qint8 vs fp32 base weights
            "qint8_vs_fp32_weights": compare(v_ex, loss_ex, g_ex, v_32, loss_32, g_32),
            "layers": layers}


def synthetic_study(K: int = 3840, N: int = 3840, M: int = 256, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w_q, w_s = quantize_weight(w, "int8")
    zero_a, zero_b = torch.zeros(1, K), torch.zeros(N, 1)
    rows = []
    for outlier in (None, 10.0, 30.0, 100.0):
        x = torch.randn(M, K, generator=g)
        if outlier is not None:
            x[:, 7] = outlier * torch.sign(torch.randn(M, generator=g))
        exact = lora_linear_reference(x, w_q, w_s, None, zero_a, zero_b, 1.0)
        q = lora_linear_reference(x, w_q, w_s, None, zero_a, zero_b, 1.0, act_quant="int8")
        rows.append({"activations": "gaussian" if outlier is None else f"gaussian + one channel at {outlier:g} std",
                     "K": K, "N": N, "M": M, "base_out_rel_err": rel(q, exact),
                     "weight_only_rel_err": rel(exact, x @ w.t())})
    return rows


def report(res: dict) -> str:
    t = res["toy"]
    L = ["# int8 activations (act_quant = \"int8\"): numerics, CPU", "",
         f"- command: `{res['meta']['command']}`",
         f"- torch {res['meta']['torch']}, Python {res['meta']['python']}, {res['meta']['wall_s']} s", "",
         "Both arms: the same qint8 base weights; only the base GEMMs' activations differ (exact vs per-token "
         "int8, forward and backward dx).", "",
         f"## Trained toy DiT, D-OPSD quantities (batch {t['batch']}, sigmas {t['sigmas']})", "",
         "| quantity | int8 vs exact activations (both qint8 weights) | for scale: qint8 vs fp32 weights |",
         "| --- | ---: | ---: |"]
    a, w = t["act_int8_vs_exact"], t["qint8_vs_fp32_weights"]
    L += [f"| student velocity, relative error | {a['velocity_rel_err']:.2e} | {w['velocity_rel_err']:.2e} |",
          f"| D-OPSD loss, relative difference | {a['loss_rel_diff']:.2e} | {w['loss_rel_diff']:.2e} |",
          f"| all student LoRA gradients, relative error | {a['grad_rel_err']:.2e} | {w['grad_rel_err']:.2e} |",
          f"| all student LoRA gradients, cosine | {a['grad_cosine']:.6f} | {w['grad_cosine']:.6f} |", "",
          "The gradient is 2·(v_s − v_t)/n: a small difference of two outputs (here loss "
          f"{a['loss_ref']:.4f}, i.e. |v_s − v_t| ≈ {a['loss_ref'] ** 0.5:.2f} of |v| ≈ 1), so the outputs' rounding "
          "shows up in it amplified by about |v| / |v_s − v_t|.", "",
          "Per LoRA'd linear (base output on the layer's real inputs, isolated; gradients end to end):", "",
         "| layer | base output rel. err | input max/rms per token | grad A rel. err | grad B rel. err |",
         "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in t["layers"].items():
        L.append(f"| {name} | {r['base_out_rel_err']:.2e} | {r['input_max_over_rms']:.1f} | "
                 f"{r['grad_A_rel_err']:.2e} | {r['grad_B_rel_err']:.2e} |")
    L += ["", "## Synthetic rows at Z-Image's width", "",
          "| activations | K | N | int8 vs exact activations (qint8 weights) | for scale: qint8 vs fp32 weights |",
          "| --- | ---: | ---: | ---: | ---: |"]
    for r in res["synthetic"]:
        L.append(f"| {r['activations']} | {r['K']} | {r['N']} | {r['base_out_rel_err']:.2e} | "
                 f"{r['weight_only_rel_err']:.2e} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    res = {"toy": toy_study(a.batch, a.seed), "synthetic": synthetic_study()}
    res["meta"] = {"command": "python benchmarks/act8_numerics.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "wall_s": round(time.time() - t0, 1)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "act8-numerics-cpu.json").write_text(json.dumps(res, indent=1))
    (out / "act8-numerics-cpu.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
