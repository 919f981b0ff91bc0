"""`plan --gpus N`: what training on N GPUs changes in a step, as an expectation (docs/multi-gpu.md).

Data parallelism changes no GPU's memory (each holds the base, both LoRA sets and the optimizer) and
divides the step's roll-outs: the step takes the roll-outs of the busiest GPU, plus one sum of the LoRA
gradients over the GPUs. That sum is priced at assumed bus speeds; the roll-out time is the one measured
on one H100. Nothing here was measured with several GPUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The settings a family's `rollout_s_h100` was measured at (families/base.py)
MEASURED_AT = {"resolution": 1024, "micro_batch": 1, "train_states": 0, "rank": 64, "rollout_steps": 0}
# Bus bandwidth an all-reduce reaches (NCCL's "bus bandwidth"): assumed, not measured here.
BUSES = {"PCIe 4.0 x16": 20e9, "NVLink (H100 SXM)": 350e9}
GRAD_BYTES = 4  # the student LoRA's gradients are fp32


@dataclass
class DataParallel:
    gpus: int
    micro_batches: int       # per step, all GPUs together
    busiest: int             # micro-batches of the busiest GPU
    lora_params: int
    rollout_s: float | None  # one micro-batch's roll-out time on one GPU, when known
    rollout_from: str = "the H100's measured"  # where rollout_s comes from, as the output says it
    buses: tuple[str, ...] = tuple(BUSES)       # the connections to price the gradient sum over (BUSES' keys)

    @property
    def grad_bytes(self) -> int:
        return self.lora_params * GRAD_BYTES

    @property
    def sent_bytes(self) -> float:
        """What each GPU sends in a ring all-reduce: 2 (N - 1) / N of the gradient."""
        return 2 * (self.gpus - 1) / self.gpus * self.grad_bytes

    def step_s(self, bus_bytes_per_s: float) -> float | None:
        if self.rollout_s is None:
            return None
        return self.busiest * self.rollout_s + self.sent_bytes / bus_bytes_per_s

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "micro_batches": self.micro_batches, "busiest_gpu_micro_batches": self.busiest,
                "allreduce_bytes": self.grad_bytes, "sent_per_gpu_bytes": round(self.sent_bytes),
                "rollout_s": self.rollout_s, "rollout_from": self.rollout_from,
                "expected_step_s": {bus: self.step_s(BUSES[bus]) for bus in self.buses},
                "one_gpu_step_s": None if self.rollout_s is None else self.micro_batches * self.rollout_s}


def data_parallel(gpus: int, cfg, family, lora_params: int, predicted=None) -> DataParallel:
    """`cfg`: the run's TrainConfig; `family`: its Family class, whose measured H100 roll-out time applies at
    the settings it was measured at; `predicted`: `plan --gpu NAME`'s timeplan.TimePlan, whose roll-out time
    (for that GPU and these settings) is used instead."""
    split = (gpus, cfg.grad_accum, math.ceil(cfg.grad_accum / gpus), lora_params)
    if predicted is not None:
        how = "measured" if predicted.measured else "predicted (timeplan.py)"
        buses = tuple(BUSES) if predicted.gpu.nvlink else tuple(b for b in BUSES if not b.startswith("NVLink"))
        return DataParallel(*split, predicted.seconds * cfg.micro_batch, f"the {predicted.gpu.name}'s {how}", buses)
    measured = all(getattr(cfg, k) == v for k, v in MEASURED_AT.items())
    return DataParallel(*split, (family.rollout_s_h100 or None) if measured else None)


def render(dp: DataParallel, console) -> None:
    """The lines `plan --gpus N` prints under the memory table."""
    console.print(f"{dp.gpus} GPUs, data parallel: each GPU needs the memory above (it holds everything) and "
                  f"rolls out at most {dp.busiest} of the step's {dp.micro_batches} micro-batches"
                  + (f" (they do not divide evenly: some GPUs wait)" if dp.micro_batches % dp.gpus else "") + ".")
    console.print(f"Gradient sum per step: {dp.grad_bytes / 1e9:.2f} GB (the fp32 student LoRA, "
                  f"{dp.lora_params / 1e6:.1f}M parameters); each GPU sends {dp.sent_bytes / 1e9:.2f} GB of it "
                  "(a ring all-reduce).")
    if dp.rollout_s is None:
        console.print("Expected step: your one-GPU seconds per roll-out x "
                      f"{dp.busiest}, plus the gradient sum (no roll-out time was measured at these settings).")
        return
    buses = ", ".join(f"{dp.step_s(BUSES[bus]):.2f} s over {bus} (assumed {BUSES[bus] / 1e9:.0f} GB/s)"
                      for bus in dp.buses)
    console.print(f"Expected step, if each GPU rolls out a micro-batch in {dp.rollout_from} {dp.rollout_s:.3g} s: "
                  f"{buses}; one GPU: {dp.micro_batches * dp.rollout_s:.2f} s. Not measured with several GPUs.")
