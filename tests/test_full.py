"""Full fine-tuning (train_mode = "full", issue #35) on the CPU: FSDP2 over 2 gloo ranks against one process.

The reference is unsharded: one process, plain modules, the fp32 master weights updated by AdamW, the
forward and backward run on a copy in the compute dtype, each backward's gradient added to the master's in
fp32 (what FSDP2's mixed precision does, without sharding or collectives). Two ranks compute each micro-batch
exactly as the reference does; only the order in which the gradients add up differs (each backward's two
ranks' gradients are summed, then added to the step's), ~1e-7 of a gradient in fp32. AdamW's step divides by
the root of its second moment, which lets elements of tiny gradient move by up to ~1e-3 of a step more or less:
TOL = 2e-5 absolute at lr 1e-3 (a weight moves ~1e-3 a step), 50x below one step's change. Bit for bit where
nothing is summed in another order: a resume on the same number of ranks.

Runs: Z-Image in bf16 (mixed precision: shards fp32, blocks gathered in bf16) and klein in fp32, each 2 ranks
against the reference; Z-Image's run then resumes on 2 ranks (exact) and on 1 (DCP reshards), and its exported
transformer loads in the stock pipeline and as a single file (klein's too). FLUX.3 (fp32) on 2 ranks against the reference
too, its folder in the stock modular pipeline.
"""
import copy
import hashlib
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lowvram_dopsd import checkpoint, full_io, optim
from lowvram_dopsd.config import load_config
from lowvram_dopsd.errors import EXIT_RANK_LOST
from lowvram_dopsd.families import load_family

from dist_helpers import fork_job

TOL = 2e-5
PROMPT = "a photo of sks ball on the beach"


def settings(model, images, cache, out, **over):
    base = dict(model=str(model), images=str(images), cache_dir=str(cache), output=str(out), train_mode="full",
                steps=3, batch_size=2, rollout_steps=2, train_states=1, lr=1e-3, grad_checkpointing="true",
                save_every=1, keep_checkpoints=0)
    return {**base, **{k: str(v) for k, v in over.items()}}


def _train(over: dict, resume: str | None = None, latents_to: str | None = None) -> int:
    """One rank of a job: train (or resume) with `over`; `latents_to`: then sample the student, rank 0 saves."""
    from lowvram_dopsd.preview import few_step_sample
    from lowvram_dopsd.train import train

    cfg = load_config("cpu-demo", over)
    run = train(cfg, "cpu-demo", resume=resume, command=["train"])
    if latents_to:
        family = run.family
        (cond,) = family.encode_student([PROMPT], cfg, torch.device("cpu"))
        noise = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(7))
        x = few_step_sample(family, run.model, run.lora, "student", noise, family.sigmas(64, 64, 2), [cond])
        if int(os.environ.get("RANK", "0")) == 0:
            from torch.distributed.fsdp import FSDPModule

            units = {role: [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
                     for role, model in (("student", run.lora.student), ("teacher", run.lora.teacher))}
            torch.save({"noise": noise, "latents": x, "units": units}, latents_to)
    return 0


class Unsharded:
    """The reference weight sets: the student's fp32 master and its compute-dtype copy, the EMA teacher (fp32)."""

    holds_base = False

    def __init__(self, family, cfg):
        self.master = family.load_transformer(cfg, torch.device("cpu"), torch.float32).requires_grad_(True)
        self.teacher = family.load_transformer(cfg, torch.device("cpu"), torch.float32)
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]
        self.compute = {"student": copy.deepcopy(self.master).to(dtype),
                        "teacher": copy.deepcopy(self.teacher).to(dtype)}
        for p, master in zip(self.compute["student"].parameters(), self.master.parameters()):
            p.register_post_accumulate_grad_hook(lambda p, m=master: self._to_master(p, m))
        self.model = self
        self._dopsd_dtype, self.active = dtype, "student"

    @staticmethod
    def _to_master(p, master):  # each backward's gradient, in fp32, added to the master's
        g = p.grad.float()
        master.grad = g if master.grad is None else master.grad + g
        p.grad = None

    def __call__(self, *args, **kwargs):
        return self.compute[self.active](*args, **kwargs)

    def use(self, role):
        from contextlib import contextmanager

        @contextmanager
        def active():
            with torch.no_grad():  # what FSDP gathers for each pass: the master cast to the compute dtype
                for src, dst in ((self.master, self.compute["student"]), (self.teacher, self.compute["teacher"])):
                    for a, b in zip(src.parameters(), dst.parameters()):
                        b.copy_(a)
            previous, self.active = self.active, role
            try:
                yield self.compute[role]
            finally:
                self.active = previous
        return active()

    def student_parameters(self):
        return list(self.master.parameters())

    @torch.no_grad()
    def ema_update(self, decay):
        torch._foreach_lerp_(list(self.teacher.parameters()), self.student_parameters(), 1.0 - decay)


def _reference_step(over: dict, out: str) -> int:
    """One step of the run `over` describes, unsharded, in one process: train_step on the Unsharded weights."""
    from lowvram_dopsd.guard import RunGuard
    from lowvram_dopsd.train import draw_batch, setup, train_step

    cfg = load_config("cpu-demo", {**over, "steps": "1"})
    with RunGuard(None, None) as guard:
        run = setup(cfg, "cpu-demo", guard=guard)
        ref = Unsharded(run.family, cfg)
        run.model, run.lora, run.params = ref, ref, ref.student_parameters()
        run.optimizer = torch.optim.AdamW(run.params, lr=run.lr, weight_decay=cfg.weight_decay)
        run.scheduler = optim.make_scheduler(run.optimizer, cfg)
        result = train_step(run, draw_batch(run))
        torch.save({"student": ref.master.state_dict(), "teacher": ref.teacher.state_dict(),
                    "loss": result.loss, "grad_norm": result.grad_norm}, out)
    return 0


def saved(step_dir, family, cfg):
    """A full checkpoint's student and teacher, read whole in this process (DCP without a process group)."""
    import torch.distributed.checkpoint as dcp

    model = family.load_transformer(cfg, torch.device("cpu"), torch.float32)
    state = {role: {k: torch.empty_like(v) for k, v in model.state_dict().items()} for role in ("student", "teacher")}
    dcp.load(state, storage_reader=full_io.SafeReader(step_dir / "weights"), no_dist=True)
    return state


def assert_same_step(out, ref):
    """Adam does not see a gradient's scale (ranks averaging where they should sum would pass the parameters'
    check): the loss and the gradient norm the run logged are the reference's too."""
    (first, *_) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert first["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert first["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst
    return worst


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*"))}


@pytest.fixture(scope="module")
def zimage(tiny_zimage_dir, tiny_vlm_dir, demo_images, tmp_path_factory):
    """2 ranks, 3 steps (a checkpoint after each), bf16; the unsharded reference's step 1."""
    root = tmp_path_factory.mktemp("full-zimage")
    over = settings(tiny_zimage_dir, demo_images, root / "cache", root / "two", dtype="bf16", batch_size=4,
                    teacher_encoder=tiny_vlm_dir, preview_every=3, preview_prompts=PROMPT)
    base = digest(tiny_zimage_dir / "transformer")
    assert fork_job(2, _train, over, None, str(root / "latents.pt")) == [0, 0]
    assert fork_job(1, _reference_step, {**over, "output": str(root / "ref")}, str(root / "ref.pt")) == [0]
    return root, over, base


def test_two_ranks_take_the_step_of_one_unsharded_process_zimage_bf16(zimage):
    root, over, _ = zimage
    cfg = load_config("cpu-demo", over)
    family = load_family(cfg.model)
    two = saved(root / "two" / "checkpoints" / "step-000001", family, cfg)
    ref = torch.load(root / "ref.pt")
    assert_close(two["student"], ref["student"], TOL)
    assert_close(two["teacher"], ref["teacher"], TOL)
    assert_same_step(root / "two", ref)
    model = family.load_transformer(cfg, torch.device("cpu"), torch.float32)
    start = {k: v.float() for k, v in model.state_dict().items()}
    moved = max((ref["student"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 20 * TOL  # the step itself is far above the tolerance
    # sharded per block (each gathered only while it runs) and at the root, student and teacher alike
    from lowvram_dopsd.quant import units

    blocks = [name for name, _ in units(model) if name.rsplit(".", 1)[-1].isdigit()]
    assert "layers.1" in blocks and "noise_refiner.0" in blocks
    assert torch.load(root / "latents.pt")["units"] == {role: [""] + blocks for role in ("student", "teacher")}
    # both ranks sampled the previews (each pass gathers the weights), rank 0 wrote them
    assert sorted(p.name for p in (root / "two" / "previews").iterdir()) == ["step-000000.png", "step-000003.png"]


def test_the_ema_teacher_is_the_formula_on_the_gathered_weights(zimage, tiny_zimage_dir):
    root, over, base = zimage
    cfg = load_config("cpu-demo", over)
    family = load_family(cfg.model)
    start = family.load_transformer(cfg, torch.device("cpu"), torch.float32).state_dict()
    one = saved(root / "two" / "checkpoints" / "step-000001", family, cfg)
    two = saved(root / "two" / "checkpoints" / "step-000002", family, cfg)
    for k in start:  # teacher_1 = lerp(base, student_1), teacher_2 = lerp(teacher_1, student_2), decay 0.9
        assert torch.equal(one["teacher"][k], torch.lerp(start[k], one["student"][k], 1 - cfg.ema_decay)), k
        assert torch.equal(two["teacher"][k], torch.lerp(one["teacher"][k], two["student"][k], 1 - cfg.ema_decay)), k
    assert digest(tiny_zimage_dir / "transformer") == base  # the base checkpoint on disk is never written


def test_resume_on_two_ranks_is_exact_and_one_rank_reads_a_two_rank_checkpoint(zimage):
    root, over, _ = zimage
    cfg = load_config("cpu-demo", over)
    family = load_family(cfg.model)
    from_two = str(root / "two" / "checkpoints" / "step-000002")
    assert fork_job(2, _train, {**over, "output": str(root / "again")}, from_two) == [0, 0]
    assert fork_job(1, _train, {**over, "output": str(root / "one")}, from_two) == [0]
    ref = saved(root / "two" / "checkpoints" / "step-000003", family, cfg)
    again = saved(root / "again" / "checkpoints" / "step-000003", family, cfg)
    for role in ("student", "teacher"):
        assert all(torch.equal(again[role][k], ref[role][k]) for k in ref[role]), role
    one = saved(root / "one" / "checkpoints" / "step-000003", family, cfg)
    assert_close(one["student"], ref["student"], TOL)
    # the optimizer state came along: the same step from a fresh AdamW moves every weight by ~lr
    before = saved(root / "two" / "checkpoints" / "step-000002", family, cfg)["student"]
    assert max((ref["student"][k] - before[k]).abs().max().item() for k in ref["student"]) > 20 * TOL
    metrics = [json.loads(line) for line in (root / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3]


def _signalled(over: dict, rank: int, call: int, sig: int = signal.SIGINT) -> int:
    """One rank of a job run through the command line; rank `rank` gets `sig` (Ctrl-C's SIGINT, or kill -9),
    to itself alone, at its `call`-th roll-out."""
    import lowvram_dopsd.train as train_mod
    from lowvram_dopsd.cli import main

    real, calls = train_mod.rollout_and_learn, [0]

    def counted(*a, **k):
        calls[0] += 1
        if (int(os.environ["RANK"]), calls[0]) == (rank, call):
            os.kill(os.getpid(), sig)
        return real(*a, **k)
    train_mod.rollout_and_learn = counted
    return main(["train", "--preset", "cpu-demo", *(a for k, v in over.items() for a in ("--set", f"{k}={v}"))])


def test_ctrl_c_on_one_rank_stops_both_after_the_same_step_with_every_shard_saved(zimage):
    """Rank 1 gets Ctrl-C in step 2 (its 3rd roll-out: 2 per step each): both finish step 2, every rank writes
    its shards of the checkpoint, both exit 75; the checkpoint is the uninterrupted run's step 2, bit for bit,
    and no transformer is written (the checkpoint holds it; --resume writes it at the end)."""
    root, over, _ = zimage
    out = root / "stopped"
    assert fork_job(2, _signalled, {**over, "output": str(out), "preview_every": 0}, 1, 3) == [75, 75]
    assert [p.name for _, p in checkpoint.list_checkpoints(out)] == ["step-000001", "step-000002"]
    cfg = load_config("cpu-demo", over)
    family = load_family(cfg.model)
    got = saved(out / "checkpoints" / "step-000002", family, cfg)
    ref = saved(root / "two" / "checkpoints" / "step-000002", family, cfg)
    assert all(torch.equal(got[r][k], ref[r][k]) for r in ref for k in ref[r])
    assert not (out / "transformer").exists()


def test_a_rank_killed_mid_step_ends_the_job_and_the_last_checkpoint_is_whole(zimage, capfd):
    """Rank 1 is killed (kill -9) in step 2, while rank 0 waits in a sharded pass's gather: rank 0 exits 69
    naming it, and the checkpoint of step 1 (every rank's shards) is whole."""
    root, over, _ = zimage
    out = root / "killed"
    assert fork_job(2, _signalled, {**over, "output": str(out), "preview_every": 0}, 1, 3, signal.SIGKILL,
                    timeout=60) == [EXIT_RANK_LOST, -signal.SIGKILL]
    assert "error: rank 1 " in capfd.readouterr().err
    assert [p.name for _, p in checkpoint.list_checkpoints(out)] == ["step-000001"]
    cfg = load_config("cpu-demo", over)
    got = saved(out / "checkpoints" / "step-000001", load_family(cfg.model), cfg)
    ref = saved(root / "two" / "checkpoints" / "step-000001", load_family(cfg.model), cfg)
    assert all(torch.equal(got[r][k], ref[r][k]) for r in ref for k in ref[r])


def test_the_transformer_folder_loads_in_the_stock_pipeline_as_the_student_samples(zimage, tiny_zimage_dir):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    root, over, _ = zimage
    out = root / "two"
    ours = torch.load(root / "latents.pt")
    transformer = ZImageTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.bfloat16)
    pipe = ZImagePipeline.from_pretrained(tiny_zimage_dir, transformer=transformer, torch_dtype=torch.bfloat16)
    ref = pipe(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=64,
               latents=ours["noise"].clone(), output_type="latent").images
    err = ((ref.float() - ours["latents"]).norm() / ref.float().norm()).item()
    assert err < 1e-3, err
    # the single file (ComfyUI's layout) reads back through diffusers' own converter as the same weights
    single = out / "comfyui" / f"{out.name}.safetensors"
    keys = set(load_file(str(single)))
    assert any(".attention.qkv." in k for k in keys) and not any(".to_q." in k for k in keys)  # the other layout
    again = ZImageTransformer2DModel.from_single_file(str(single), config=str(tiny_zimage_dir),
                                                      subfolder="transformer", torch_dtype=torch.bfloat16)
    mine = transformer.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in again.state_dict().items())
    # and they are the student's last checkpoint, in the compute dtype
    cfg = load_config("cpu-demo", over)
    last = saved(out / "checkpoints" / "step-000003", load_family(cfg.model), cfg)["student"]
    assert all(torch.equal(mine[k], last[k].to(torch.bfloat16)) for k in last)


def test_klein_two_ranks_take_the_step_of_one_unsharded_process_fp32(tiny_klein_dir, demo_images, tmp_path):
    over = settings(tiny_klein_dir, demo_images, tmp_path / "cache", tmp_path / "two", steps=1, teacher="edit")
    assert fork_job(2, _train, over, None, str(tmp_path / "latents.pt")) == [0, 0]
    assert fork_job(1, _reference_step, {**over, "output": str(tmp_path / "ref")}, str(tmp_path / "ref.pt")) == [0]
    cfg = load_config("cpu-demo", over)
    two = saved(tmp_path / "two" / "checkpoints" / "step-000001", load_family(cfg.model), cfg)
    ref = torch.load(tmp_path / "ref.pt")
    assert_close(two["student"], ref["student"], TOL)
    assert_close(two["teacher"], ref["teacher"], TOL)
    assert_same_step(tmp_path / "two", ref)
    # its transformer folder and single file (BFL's layout) hold the student, read by diffusers' loaders
    from diffusers import Flux2Transformer2DModel

    out = tmp_path / "two"
    folder = Flux2Transformer2DModel.from_pretrained(out / "transformer").state_dict()
    assert folder.keys() == two["student"].keys()
    assert all(torch.equal(folder[k], two["student"][k]) for k in folder)
    single = Flux2Transformer2DModel.from_single_file(str(out / "comfyui" / f"{out.name}.safetensors"),
                                                      config=str(tiny_klein_dir), subfolder="transformer")
    assert all(torch.equal(v, folder[k]) for k, v in single.state_dict().items())
    # the folder in the stock Flux2KleinPipeline: the student's latents from the same noise (packed, as its
    # denoising loop holds them after the last step)
    from diffusers import Flux2KleinPipeline

    ours = torch.load(tmp_path / "latents.pt")
    last = []

    def roll_out(transformer):
        pipe = Flux2KleinPipeline.from_pretrained(tiny_klein_dir, transformer=transformer, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
             latents=ours["noise"].clone(), max_sequence_length=cfg.max_sequence_length, output_type="latent",
             callback_on_step_end=lambda _p, _i, _t, kw: last.append(kw["latents"].clone()) or {})
        return last[-1]
    mine = Flux2KleinPipeline._pack_latents(ours["latents"])
    stock = roll_out(Flux2Transformer2DModel.from_pretrained(out / "transformer"))
    err = ((stock - mine).norm() / mine.norm()).item()
    assert err < 1e-5, err
    base = roll_out(Flux2Transformer2DModel.from_pretrained(tiny_klein_dir / "transformer"))
    assert ((base - stock).norm() / stock.norm()).item() > 1e-3  # the step changed the roll-out


def _cli(args: list[str]) -> int:
    from lowvram_dopsd.cli import main

    return main(args)


def test_flux3_asks_for_a_learning_rate_and_trains_once_given_one(tiny_flux3_dir, demo_images, tmp_path, capfd,
                                                                  timed_on_4090):
    """The paper gives FLUX.3 no full fine-tuning learning rate: refused before loading, in one paragraph naming
    the flag, and the command with that flag added trains (one process: the sharded code, a group of one),
    saying first how long it will take (timeplan: every weight's gradient counted; what is left out said)."""
    import re

    from lowvram_dopsd.cli import main

    args = ["train", "--preset", "full-8x24gb", "--device", "cpu", "--model", str(tiny_flux3_dir),
            "--images", str(demo_images), "--output", str(tmp_path / "out")]
    assert main(args) == 2
    err = capfd.readouterr().err
    assert "the paper gives none for full fine-tuning of the flux3 family" in " ".join(err.split())
    assert "\n\n" not in err.strip() and not (tmp_path / "out").exists()  # one paragraph, before any work
    flag = re.search(r"add (--lr \S+) to the command", " ".join(err.split()))[1].split()
    small = {"steps": 1, "batch_size": 1, "resolution": 64, "dtype": "fp32", "rollout_steps": 2, "train_states": 1,
             "max_sequence_length": 64, "preview_every": 0, "cache_dir": tmp_path / "cache"}  # a CPU-sized run
    assert fork_job(1, _cli, args + flag + [a for k, v in small.items() for a in ("--set", f"{k}={v}")]) == [0]
    printed = " ".join(capfd.readouterr().out.split())
    assert "time on the RTX 4090 (predicted, not measured): " in printed
    assert "Full fine-tune: the count includes every weight's gradient" in printed and "one GPU has no" in printed
    assert (tmp_path / "out" / "transformer" / "config.json").is_file()
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == float(flag[1])


def test_flux3_two_ranks_take_the_unsharded_step_and_its_folder_loads_in_the_stock_pipeline(
        tiny_flux3_dir, demo_images, tmp_path):
    """FLUX.3 (a flow map; blocks inside a ModuleDict, and reference-image blocks only the edit teacher runs):
    2 ranks take the unsharded step, each of its blocks is an FSDP unit, and the transformer folder, loaded as
    the printed "load it" line does into the stock modular pipeline, reproduces the student's latents from the
    same noise. The single file (original names, not for ComfyUI: it has no FLUX.3) loads with diffusers'
    from_single_file, as printed, as the same weights."""
    from diffusers import Flux3Transformer2DModel

    from lowvram_dopsd import advice

    out = tmp_path / "two"
    over = settings(tiny_flux3_dir, demo_images, tmp_path / "cache", out, steps=1)
    assert fork_job(2, _train, over, None, str(tmp_path / "latents.pt")) == [0, 0]
    assert fork_job(1, _reference_step, {**over, "output": str(tmp_path / "ref")}, str(tmp_path / "ref.pt")) == [0]
    cfg = load_config("cpu-demo", over)
    family = load_family(cfg.model)
    two = saved(out / "checkpoints" / "step-000001", family, cfg)
    ref = torch.load(tmp_path / "ref.pt")
    assert_close(two["student"], ref["student"], TOL)
    assert_close(two["teacher"], ref["teacher"], TOL)
    assert_same_step(out, ref)
    start = family.load_transformer(cfg, torch.device("cpu"), torch.float32).state_dict()
    assert max((ref["student"][k] - start[k]).abs().max().item() for k in start) > 20 * TOL  # the step is seen
    ours = torch.load(tmp_path / "latents.pt")
    assert {"mode_blocks.image.0", "mode_blocks.image_cond.0", "txt_mode_blocks.0",
            "single_transformer_blocks.0"} <= set(ours["units"]["student"])
    single = out / "single-file" / f"{out.name}.safetensors"
    assert not (out / "comfyui").exists() and full_io.single_file(out) == single
    keys = set(load_file(str(single)))
    assert "single_blocks.0.q_proj.weight" in keys and "early_stream_modulations.image.lin.weight" in keys
    commands = advice.full_use_commands(cfg, family, out / "transformer", single)
    assert "ComfyUI" not in commands
    scope: dict = {}
    exec(commands["or from the single file"], scope)
    folder = Flux3Transformer2DModel.from_pretrained(out / "transformer").state_dict()
    assert scope["t"].state_dict().keys() == folder.keys()
    assert all(torch.equal(v, folder[k]) for k, v in scope["t"].state_dict().items())
    scope = {}
    exec(commands["load it"], scope)
    pipe = scope["pipe"]
    assert isinstance(pipe.transformer, Flux3Transformer2DModel) and pipe.transformer is scope["t"]
    pipe.update_components(tokenizer=family.prompt_processor())  # AutoProcessor needs torchvision (not in CI)
    pipe.set_progress_bar_config(disable=True)

    def roll_out():
        return pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=2, latents=ours["noise"].clone(),
                    max_sequence_length=cfg.max_sequence_length, output="latents")
    latents = roll_out()
    err = ((latents - ours["latents"]).norm() / latents.norm()).item()
    assert err < 1e-5, err
    pipe.update_components(transformer=Flux3Transformer2DModel.from_pretrained(tiny_flux3_dir / "transformer"))
    assert ((roll_out() - latents).norm() / latents.norm()).item() > 1e-3  # the base's: the step changed it


def _bf16_ema_update(model: str) -> int:
    """One rank: FullWeights of `model` with a bf16 EMA teacher, the student moved, one EMA update checked."""
    from lowvram_dopsd.full import FullWeights

    cfg = load_config("cpu-demo", {"model": model, "train_mode": "full", "ema_dtype": "bf16"})
    weights = FullWeights.load(load_family(cfg.model), cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in weights.student.parameters():
            p.to_local().add_(torch.randn(p.to_local().shape, generator=gen))
    before = {n: t.to_local().clone() for n, t in weights.teacher.named_parameters()}
    student = dict(weights.student.named_parameters())
    weights.ema_update(0.9)
    dtypes = set()
    for name, t in weights.teacher.named_parameters():
        x = torch.lerp(before[name].float(), student[name].to_local(), 0.1)
        got, dtypes = t.to_local(), dtypes | {t.dtype}
        if t.dtype == torch.float32:  # exact where the teacher is fp32
            assert torch.equal(got, x), name
        else:  # one of the two bf16 neighbours of the formula
            assert ((got.float() - x).abs() <= x.abs() * 2**-7).all(), name
    assert dtypes == {torch.float32, torch.bfloat16}
    assert weights.teacher_dtype() == "bfloat16"  # what most of it holds
    return 0


def test_a_bf16_ema_teacher_updates_the_tensors_flux3_keeps_in_fp32(tiny_flux3_dir):
    """FLUX.3 keeps its QK norms in fp32 in a bf16 model: the EMA lerps those and rounds the rest."""
    assert fork_job(1, _bf16_ema_update, str(tiny_flux3_dir)) == [0]


def _offloaded_ema(_=None) -> int:
    """One rank: a teacher on another device than the student (meta standing in for a GPU/host pair); the EMA
    update's copies of the student onto the teacher's device are counted while they are alive."""
    import weakref

    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.utils._python_dispatch import TorchDispatchMode

    from lowvram_dopsd.full import FullWeights, device_mesh

    mesh = device_mesh(torch.device("cpu"))
    student = fully_shard(nn.Sequential(*(nn.Linear(8, 8) for _ in range(4))), mesh=mesh)
    with torch.device("meta"):
        teacher = fully_shard(nn.Sequential(*(nn.Linear(8, 8) for _ in range(4))), mesh=mesh)

    class Copies(TorchDispatchMode):
        alive: list = []
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.device.type == "meta" and args[0].device.type == "cpu":
                self.alive = [r for r in self.alive if r() is not None] + [weakref.ref(out)]
                self.most = max(self.most, len(self.alive))
            return out
    with Copies() as copies:
        FullWeights(student, teacher, torch.float32).ema_update(0.9)
    assert copies.most == 1, copies.most  # one tensor at a time, not the whole shard (8 tensors)
    return 0


def test_an_offloaded_teacher_gets_the_student_one_tensor_at_a_time():
    assert fork_job(1, _offloaded_ema) == [0]


@pytest.mark.parametrize("family", ["klein", "flux3"])
def test_micro_batches_of_several_prompts_are_refused_where_each_prompt_may_run_alone(
        family, tiny_klein_dir, tiny_flux3_dir, demo_images, tmp_path, capfd):
    """klein's and FLUX.3's velocity runs prompts of different lengths one at a time: with micro_batch 2 the
    ranks of a full fine-tune could make different numbers of sharded passes (a hang). Refused before loading,
    in one paragraph; the advised --micro-batch 1 trains."""
    model = {"klein": tiny_klein_dir, "flux3": tiny_flux3_dir}[family]
    over = settings(model, demo_images, tmp_path / "cache", tmp_path / "out", steps=1, batch_size=4, dtype="fp32")
    args = ["train", "--preset", "cpu-demo", *(a for k, v in over.items() for a in ("--set", f"{k}={v}"))]
    assert fork_job(2, _cli, args + ["--micro-batch", "2"]) == [2, 2]
    err = " ".join(capfd.readouterr().err.split())
    assert f"needs micro_batch = 1 for the {family} family" in err and "Set --micro-batch 1" in err, err
    assert not (tmp_path / "out").exists()
    if family == "klein":
        assert fork_job(2, _cli, args + ["--micro-batch", "1"]) == [0, 0]


def test_one_pass_per_micro_batch_says_how_many_transformer_calls_prompts_of_two_lengths_make(
        tiny_zimage_dir, tiny_klein_dir, tiny_flux3_dir):
    """Family.one_pass_per_micro_batch (what the refusal above reads) against each family's velocity: a
    micro-batch of two prompts of different lengths is one transformer call (Z-Image) or one per prompt."""
    seen = set()
    for model in (tiny_zimage_dir, tiny_klein_dir, tiny_flux3_dir):
        cfg = load_config("cpu-demo", {"model": str(model), "dtype": "fp32", "resolution": "64"})
        family = load_family(cfg.model)
        seen.add(family.one_pass_per_micro_batch)
        transformer = family.load_transformer(cfg, torch.device("cpu"), torch.float32)
        calls = []
        transformer.register_forward_hook(lambda *_: calls.append(1))
        (cond, _) = family.random_conditions("vlm", cfg, torch.device("cpu"), torch.float32)
        conds = [cond, {**cond, "cap": cond["cap"][:-16]}]
        x = torch.randn(2, *family.latent_shape(64, 64))
        sigmas = family.sigmas(64, 64, 2)
        with torch.no_grad():
            family.velocity(transformer, x, sigmas[0], conds, sigmas[1])
        assert len(calls) == (1 if family.one_pass_per_micro_batch else 2), (family.name, len(calls))
    assert seen == {True, False}


def test_the_run_line_says_host_ram_only_for_a_teacher_offloaded_from_the_gpu():
    from torch import nn

    from lowvram_dopsd.full import FullWeights

    assert FullWeights(nn.Linear(4, 4), nn.Linear(4, 4), torch.float32).teacher_dtype() == "float32"  # a CPU run
    with torch.device("meta"):  # standing in for the GPU the student is on
        student = nn.Linear(4, 4)
    offloaded = FullWeights(student, nn.Linear(4, 4).bfloat16(), torch.bfloat16)
    assert offloaded.teacher_dtype() == "bfloat16 in host RAM"
