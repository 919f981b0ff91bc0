"""Command line: `lowvram-dopsd train | demo | plan | presets | settings | sample | eval | export`.

    lowvram-dopsd train --preset 16gb --images ./my_dog
    lowvram-dopsd train --preset 16gb --images ./my_dog --resume        # continue the run in --output
    lowvram-dopsd demo          # the toy world on the CPU: a trained 4-step model learns a ring (--world tiny)
    lowvram-dopsd settings --preset 16gb --rank 32                      # every setting, its value, what it does
    lowvram-dopsd sample --lora out --prompt "sks dog on the moon"      # stock diffusers pipeline
    lowvram-dopsd eval --lora A --lora B --images ./my_dog --trigger "sks dog"   # which LoRA is better
    lowvram-dopsd export --format comfyui out                           # ComfyUI key layout
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from .config import (FLAG_OF, FLAGS, SETTINGS, TrainConfig, coerce, field_names, load_config, preset_names,
                     read_preset, typed_value)
from .errors import EXIT_FINISHED, EXIT_INTERRUPTED, EXIT_STOPPED, Stopped, UserError
from .progress import program


SETTINGS_NOTE = ("Defaults shown are the built-in ones; a preset replaces some of them. "
                 "`lowvram-dopsd settings --preset NAME [flags]` lists every setting with the value it will have.")


def _flag_help(key: str, default: str | None = None) -> tuple[str, str]:
    """(metavar, help) of a setting's flag, from the setting's own documentation (config.py); `default`:
    what to show as its default instead of the built-in one (a command with its own, like `demo`)."""
    f = SETTINGS[key]
    choices = f.metadata["choices"]
    metavar = "{" + ",".join(c or "''" for c in choices) + "}" if choices else key.upper()
    if default is None:
        default = repr(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    return metavar, f"{f.metadata['help']} (default: {default})"


# The settings that change a step's GPU memory (plan.py reads these): `plan --help` lists their flags.
# plan accepts the others too, so a train command (with its --preset) runs as a plan.
MEMORY_SETTINGS = ("model", "teacher", "rank", "micro_batch", "resolution", "dtype", "quant", "act_quant",
                   "optimizer", "kernels", "train_mode")


def _add_train_flags(p: argparse.ArgumentParser, preset_default: str | None, resume: bool = True,
                     listed: tuple[str, ...] | None = None, defaults: dict[str, str] | None = None,
                     preset_help: str = "") -> None:
    """The settings' flags; `listed`: the ones --help shows (None: all); `defaults`: the defaults --help shows
    where the command has its own (None: the built-in ones)."""
    p.add_argument("--preset", default=preset_default,
                   help=f"shipped preset ({', '.join(preset_names())}) or a .toml file with the same keys "
                        "(base = \"16gb\" in it starts from a shipped one)" + preset_help)
    for flag, key in FLAGS.items():
        metavar, help_ = _flag_help(key, (defaults or {}).get(key))
        shown = listed is None or key in listed
        p.add_argument(flag, dest=key, default=None, metavar=metavar, help=help_ if shown else argparse.SUPPRESS)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set keep_checkpoints=5 (repeatable)")
    if resume:
        p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                       help="continue a run: the latest checkpoint in --output, or PATH (a checkpoint or "
                            "output folder)")


def _without_resume(argv: list[str]) -> list[str]:
    """The command line as typed, minus --resume [PATH]: what to run again with --resume."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if not a.startswith("--resume="):
            out.append(a)
    return [*program(), *out]


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    out = {key: getattr(args, key) for key in FLAGS.values() if getattr(args, key) is not None}
    typed = {key: f"{FLAG_OF[key]} {value}" for key, value in out.items()}  # as the user wrote it, for the error
    for item in args.overrides:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'. Settings: {', '.join(field_names())}.")
        # a key given twice with two values: which one was meant? (an unknown key is refused later)
        if key in out and key in SETTINGS and coerce(key, out[key]) != coerce(key, value):  # 1e-4 and 0.0001 agree
            raise UserError(f"'{key}' is set twice: {typed[key]} and --set {key}={value}. Keep one of them.")
        out[key], typed[key] = value, f"--set {key}={value}"
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = load_config(args.preset, _overrides(args))
    if args.gpus != 1 and (job := _gpus(args.gpus, args.argv)) is not None:
        return job
    return exit_code(train(cfg, preset=args.preset or "", resume=args.resume, command=_resume_command(args.argv)))


def _gpus(n: int, argv: list[str]) -> int | None:
    """--gpus N: this command becomes a torchrun job of N processes on this node, each of which runs it
    again (with --gpus N: their own command, and the one to resume with); returns the job's exit code
    (None in a process of the job)."""
    from . import distributed

    _check_gpu_count(n)
    if not distributed.under_torchrun():
        return distributed.hand_over_to_torchrun(n, argv)
    if int(os.environ.get("LOCAL_WORLD_SIZE", n)) != n:
        raise UserError(f"--gpus {n}, but torchrun started {os.environ['LOCAL_WORLD_SIZE']} processes on this node: "
                        "under torchrun or srun leave out --gpus (torchrun's --nproc-per-node says it).")


def _check_gpu_count(n: int | None) -> None:
    if n is not None and n < 1:
        raise UserError(f"--gpus is how many GPUs to train on (1 or more); got {n}.")


def _resume_command(argv: list[str]) -> list[str]:
    """The command to run again with --resume; for a job torchrun started itself, torchrun's (whose own
    flags this process does not know)."""
    command = _without_resume(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or "--gpus" in argv or any(a.startswith("--gpus=") for a in argv):
        return command
    return ["torchrun", "<the same torchrun flags>", "-m", "lowvram_dopsd", *command[1:]]


def exit_code(run) -> int:
    """A run's exit code: finished, or stopped by Ctrl-C / SIGTERM with a checkpoint to resume from."""
    return EXIT_STOPPED if run.stopped else EXIT_FINISHED


def demo_root() -> Path:
    """Where the demo keeps what it builds (the tiny models) and its feature cache."""
    return Path(os.environ.get("LOWVRAM_DOPSD_DEMO_DIR", Path.home() / ".cache" / "lowvram-dopsd" / "demo"))


def demo_model_dir() -> Path:
    """The tiny world's models: a tiny Z-Image + Qwen3-VL pair, built once (seconds) and reused."""
    from .tiny import make_tiny_qwen3vl, make_tiny_zimage

    root = demo_root()
    model, vlm = root / "tiny-zimage", root / "tiny-qwen3vl"
    if not (model / "model_index.json").is_file():
        make_tiny_zimage(model)
    if not (vlm / "config.json").is_file():
        make_tiny_qwen3vl(vlm, text_encoder_dir=model / "text_encoder")
    return root


def demo_world(world: str) -> tuple[str, dict[str, str]]:
    """The preset and settings of a demo world (flags and --preset replace them).

    toy (the default): the toy world (docs/toy.md), a trained 4-step 32x32 model whose teacher really reads
    the reference image, and 6 images of a shape it never saw (a ring) bound to the trigger 'sks': the
    previews show it being learnt. tiny: a random-weight tiny Z-Image and Qwen3-VL through the real
    diffusers classes, the code path of a real run, its previews noise."""
    from importlib import resources

    assets, root = resources.files("lowvram_dopsd") / "assets", demo_root()
    common = {"output": "dopsd-demo-out", "cache_dir": str(root / "features")}
    if world == "toy":
        return "toy", {**common, "model": str(assets / "toy" / "model"), "images": str(assets / "toy" / "concept"),
                       "trigger": "sks"}
    return "cpu-demo", {**common, "model": str(root / "tiny-zimage"), "teacher_encoder": str(root / "tiny-qwen3vl"),
                        "images": str(assets / "demo"), "trigger": "sks ball",
                        "preview_every": "10"}  # previews: the demo shows what it learns


def demo_defaults() -> dict[str, str]:
    """`demo --help`: each setting's value in the default (toy) world, and in the tiny one where it differs."""
    configs = {world: load_config(*demo_world(world)).to_dict() for world in ("toy", "tiny")}
    shown = {}
    for key, value in configs["toy"].items():
        tiny = configs["tiny"][key]
        shown[key] = f"{value!r}" + (f"; --world tiny: {tiny!r}" if tiny != value else "")
    return shown


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .train import train

    # The tiny model is latency-bound: on a 2-core machine one thread ran the demo at 0.44 s/step,
    # two threads (the default) at 14-63 s/step (thread wake-ups on every small op).
    torch.set_num_threads(1)
    if args.world == "tiny":
        demo_model_dir()
    preset, settings = demo_world(args.world)
    preset = args.preset or preset
    cfg = load_config(preset, {**settings, **_overrides(args)})
    return exit_code(train(cfg, preset=preset, resume=args.resume, command=_without_resume(args.argv)))


def cmd_presets(args: argparse.Namespace) -> int:
    width = max(map(len, preset_names()))
    for name in preset_names():
        data, _ = read_preset(name)
        print(f"{name:{width}s} {data.pop('description', '')}")
        print(" " * (width + 1) + ", ".join(f"{k}={v}" for k, v in data.items()))
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Every setting, grouped, with the value this preset and command line give it and what it does."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .families import family_class_of

    cfg, builtin = load_config(args.preset, _overrides(args)), TrainConfig()
    family = family_class_of(cfg.model)
    # what a setting left at "the model's default" becomes for this model
    resolved = {} if family is None else {
        "lr": f"{family.default_lr:g}", "teacher": family.teachers[0],
        "rollout_steps": str(family.default_rollout_steps),
        **({"train_states": str(family.default_train_states)} if family.default_train_states else {})}
    # Text pieces, not markup: a value or help text in square brackets is printed as it is
    console, table = Console(highlight=False, markup=False), None
    wide = console.width >= 110  # else the value goes above its description: 3 columns leave it ~20 characters
    for name, f in SETTINGS.items():
        if f.metadata["section"]:  # one table per group of settings
            if table is not None:
                console.print(table)
            table = Table(title=Text(f.metadata["section"], style="bold"), title_justify="left", box=None,
                          show_header=False, pad_edge=False)
            table.add_column(style="cyan", no_wrap=True, min_width=2 + max(map(len, SETTINGS)))
            if wide:
                table.add_column(overflow="fold", width=25)  # the same columns in every group
            table.add_column()
        value = getattr(cfg, name)
        shown = Text(typed_value(name, value) or "''", style="bold yellow" if value != getattr(builtin, name) else "")
        if name in resolved and not value:
            shown.append(f" = {resolved[name]} ({family.name})", style="dim")
        choices, flag = f.metadata["choices"], FLAG_OF.get(name)
        what = Text(f.metadata["help"])
        what.append(f" ({', '.join(map(repr, choices))})" if choices else "", style="dim")
        what.append(f" {flag}" if flag else "", style="dim")
        if wide:
            table.add_row(f"  {name}", shown, what)
        else:  # the description dim, under its value
            what.stylize("dim")
            table.add_row(f"  {name}", Text.assemble(shown, "\n", what))
    console.print(table)
    console.print(f"Values in yellow come from the preset ({args.preset or 'none'}) or the command line. Flags "
                  "set the common settings; --set key=value sets any of them.", style="dim")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Where the GPU memory of a training step goes, from the model's config alone (plan.py); with --gpus N,
    what N GPUs change (scaling.py)."""
    from . import plan, scaling
    from .progress import make_console

    _check_gpu_count(args.gpus)
    args.preset = args.preset or ("full-8x24gb" if args.train_mode == "full" else "16gb")
    cfg = load_config(args.preset, _overrides(args))
    if cfg.train_mode == "full":
        return _plan_full(args, cfg)
    budget = plan.budget_for(_gib(args.vram)) if args.vram else plan.vram_of_preset(args.preset)
    p = plan.plan_from_config(cfg, budget_gib=budget)
    fixes = plan.suggest(cfg.model, plan._settings(cfg), budget) if budget and not p.fits() else None
    time = None
    if args.gpu:  # how long, on that GPU (timeplan.py)
        from . import timeplan
        from .gpus import gpu_named

        time = timeplan.predict(plan.resolve_model(cfg.model), plan.run_settings(cfg), gpu_named(args.gpu), p.kept)
    dp = scaling.data_parallel(args.gpus, cfg, p.family, p.counts.lora, time) if (args.gpus or 1) > 1 else None
    if args.json:
        print(json.dumps({**p.to_dict(), "suggestions": [(f, s.peak_gib) for f, s in fixes or []],
                          **({"data_parallel": dp.to_dict()} if dp else {}),
                          **({"time": time.to_dict()} if time else {})}, indent=1))
    else:
        plan.render(p, suggestions=fixes)
        if dp:
            scaling.render(dp, make_console())
        if time:
            timeplan.render(time, make_console(), args.gpus or 1)
    return 0 if p.fits() else 3


def _plan_full(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """`plan` of a full fine-tune (plan_full.py): each GPU's memory on --gpus N (the preset's by default) and the
    fewest GPUs of the card that hold the run."""
    from . import plan, plan_full
    from .config import shipped_root
    from .progress import make_console

    gpus, card = plan_full.PRESET_CARDS.get(shipped_root(args.preset), (1, None))
    vram = _gib(args.vram) if args.vram else card
    fp = plan_full.make(cfg, args.gpus or gpus, plan.budget_for(vram) if vram else None)
    time = None
    if args.gpu:  # how long, on that GPU (timeplan.py: the roll-outs' FLOPs with every weight's gradient)
        from . import timeplan
        from .gpus import gpu_named

        time = timeplan.predict(plan.resolve_model(cfg.model), plan.run_settings(cfg), gpu_named(args.gpu))
    if args.json:
        print(json.dumps({**fp.to_dict(), **({"time": time.to_dict()} if time else {})}, indent=1))
    else:
        console = make_console()
        plan_full.render(fp, console)
        if time:
            timeplan.render(time, console, fp.gpus)
    return 0 if fp.fits() else 3


def cmd_sample(args: argparse.Namespace) -> int:
    from .progress import make_console
    from .sample import SampleRequest, sample

    sample(SampleRequest(loras=args.lora, prompts=args.prompt, model=args.model or "", steps=args.steps,
                         seed=args.seed, count=args.count, width=args.width, height=args.height,
                         output=args.output or "", device=args.device, dtype=args.dtype, scale=args.scale,
                         trust_remote_code=args.trust_remote_code, offload=args.offload,
                         transformer_file=args.transformer_file or ""), console=make_console())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import EvalRequest, evaluate
    from .metrics import CLIP_DEFAULT, DINO_DEFAULT
    from .progress import make_console

    evaluate(EvalRequest(loras=args.lora, images=args.images, trigger=args.trigger or "", caption=args.caption or "",
                         subject=args.subject or "", output=args.output, prompts_file=args.prompts or "",
                         prior_prompts_file=args.prior_prompts or "", captions=args.captions,
                         model=args.model or "", transformer_file=args.transformer_file or "", steps=args.steps,
                         seed=args.seed, width=args.width, height=args.height, scale=args.scale, device=args.device,
                         dtype=args.dtype, offload=args.offload, preset=args.preset or "",
                         dino_model=args.dino_model or DINO_DEFAULT, clip_model=args.clip_model or CLIP_DEFAULT,
                         trust_remote_code=args.trust_remote_code),
             console=make_console(), command=[*program(), *args.argv])
    return 0


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """How images are drawn: `sample`'s flags, shared by `eval`."""
    p.add_argument("--model", help="base model id or folder (default: the base_model in the LoRA's metadata)")
    p.add_argument("--transformer-file", help="a fine-tune's .safetensors transformer used instead of the model's "
                                              "(default: the transformer_file in the LoRA's metadata, if any)")
    p.add_argument("--steps", type=int, default=0,
                   help="sampling steps (0, the default: the model's own, Z-Image 8, klein 4, FLUX.3 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=0, help="a multiple of 16 (default: the training resolution)")
    p.add_argument("--height", type=int, default=0, help="a multiple of 16 (default: the training resolution)")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="on a GPU (the CPU uses fp32)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="model CPU offload (default: on for GPUs under 40 GB)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the base model folder to run its own Python code (off by default)")


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_comfyui

    path = export_comfyui(args.lora, args.output or "", teacher=args.teacher)
    print(f"wrote {path} (ComfyUI layout: put it in ComfyUI/models/loras and use a LoraLoaderModelOnly node)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowvram-dopsd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_PrintVersion, nargs=0,
                        help="the version of lowvram-dopsd and of the libraries it runs on (for a bug report)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a D-OPSD LoRA on a folder of images (or a .toml dataset file)",
                       description=SETTINGS_NOTE)
    _add_train_flags(p, preset_default=None)
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="train on N GPUs of this machine: hands the same command over to torchrun, N processes "
                        "each rolling out batch_size / N of every step (several machines: torchrun itself, "
                        "docs/multi-gpu.md)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="train on an embedded model and bundled images, on the CPU (the toy world: "
                                    "a trained 4-step model learns a new shape in a few minutes at most)",
                       description=demo_world.__doc__.split("\n\n")[1].replace("\n    ", " "))
    _add_train_flags(p, preset_default=None, defaults=demo_defaults(),
                     preset_help=" (default: 'toy'; --world tiny: 'cpu-demo')")
    p.add_argument("--world", choices=["toy", "tiny"], default="toy",
                   help="toy: the trained toy world (docs/toy.md), its previews show the ring being learnt; tiny: "
                        "a random-weight tiny Z-Image through the real diffusers classes (the code path of a real "
                        "run; its previews are noise) (default: toy)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("plan", help="predict the GPU memory of a training step, from the model's config alone",
                       description="Takes the train command's flags; those listed change the memory.")
    _add_train_flags(p, preset_default=None, resume=False, listed=MEMORY_SETTINGS,
                     preset_help="; default 16gb, or full-8x24gb with --train-mode full")
    p.add_argument("--vram", default=None, metavar="GIB",
                   help="your card's memory in GiB (default: the preset's card, e.g. 16gb -> 14.0 GiB allocatable)")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="also predict how long a roll-out and the whole run take on this GPU (H100, A100, 3090, 4090, "
                        "4060 Ti, 5090, ...): from the counted FLOPs and the efficiency measured on an H100; marked "
                        "as a prediction where that GPU was not measured")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="data parallel over N GPUs: the memory per GPU (unchanged), the gradient sum per step and "
                        "the expected step time (docs/multi-gpu.md); with --train-mode full, each GPU's share of the "
                        "sharded model (docs/full.md; default: the full-* preset's count)")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("settings", help="every setting, its value under a preset and your flags, and what it does",
                       description=SETTINGS_NOTE)
    _add_train_flags(p, preset_default=None, resume=False)
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("sample", help="generate with a trained LoRA through the stock diffusers pipeline")
    p.add_argument("--lora", action="append", required=True,
                   help="training output folder, checkpoint folder or .safetensors file (repeat to compare LoRAs: "
                        "the pipeline loads once and each LoRA draws the same prompts and seeds)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several images)")
    p.add_argument("--count", type=int, default=1,
                   help="images per prompt, from seeds --seed, --seed + 1, ... (default 1)")
    p.add_argument("--output", help="image file, replaced if it exists (no extension: .png), or folder. Default "
                                    "names, sample[-<lora>]-<seed>[-<prompt index>].png, never replace a file: "
                                    "a second run writes sample-0_2.png, ...")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="compare LoRAs and the base: a contact sheet and the paper's metrics",
                       description="Samples the base and each LoRA through the stock pipeline (as `sample` does) on "
                                   "the training captions, unseen prompts with the trigger and prompts without it, "
                                   "then scores concept (DINO), prompt following (CLIP), prior kept (DINO against "
                                   "the base) and few-step quality (CLIP-IQA). docs/eval.md says what each means.")
    p.add_argument("--lora", action="append", required=True,
                   help="training output folder, checkpoint folder or .safetensors file (repeat to compare LoRAs)")
    p.add_argument("--images", required=True, help="the training images (folder or .toml dataset file) the LoRAs "
                                                   "learned from: the concept score compares with them")
    p.add_argument("--trigger", help="the trigger word or phrase (default: the one in the LoRAs' metadata)")
    p.add_argument("--caption", help="the caption of images without a .txt, as in training (default: the trigger)")
    p.add_argument("--subject", help="what the trigger stands for, e.g. 'dog': CLIP reads it in the trigger's place "
                                     "(CLIP does not know the trigger)")
    p.add_argument("--prompts", metavar="FILE", help="unseen prompts, one a line, with the trigger or a [trigger] "
                                                     "placeholder (default: six built-in scenes)")
    p.add_argument("--prior-prompts", metavar="FILE", help="prompts without the trigger, one a line (default: six "
                                                           "built-in ones)")
    p.add_argument("--captions", type=int, default=6, help="training captions sampled, spread over the data set "
                                                           "(default 6)")
    p.add_argument("--output", default="eval", help="folder for the images, sheet.png, eval.json and steps.png "
                                                    "(default ./eval; files of an earlier eval there are replaced)")
    p.add_argument("--preset", help="the card preset (12gb, 16gb, 24gb) whose memory the metric models must fit "
                                    "(default: the GPU's own); one that does not fit runs on the CPU")
    # the defaults are metrics.DINO_DEFAULT / CLIP_DEFAULT (not imported here: that module imports torch)
    p.add_argument("--dino-model", help="DINO model id or folder (default facebook/dinov3-vits16plus-pretrain-"
                                        "lvd1689m, the paper's DINOv3 ViT-S+/16; gated: accept its license first)")
    p.add_argument("--clip-model", help="CLIP model id or folder (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the "
                                        "authors' scoring script's)")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write the LoRA in another tool's key layout")
    p.add_argument("lora", help="training output folder, checkpoint folder or .safetensors file")
    p.add_argument("--format", required=True, choices=("comfyui",))
    p.add_argument("--output", help="file to write (default <lora>/comfyui/<name>.safetensors; for a checkpoint "
                                    "folder <run>/comfyui/step-N.safetensors, which checkpoint rotation keeps)")
    p.add_argument("--teacher", action="store_true", help="export the EMA teacher LoRA instead of the student")
    p.set_defaults(func=cmd_export)
    return parser


def version_text() -> str:
    """`lowvram-dopsd --version`: ours, then the versions that change results (read from the installed
    packages' metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def of(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    libraries = ", ".join(of(name) for name in ("torch", "diffusers", "transformers", "peft", "triton"))
    return f"lowvram-dopsd {__version__} (python {sys.version.split()[0]}; {libraries})"


class _PrintVersion(argparse.Action):
    """--version: one line, unwrapped (argparse's own version action wraps it at the terminal's width)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _gib(text: str) -> float:
    """--vram: a card's memory in GiB."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1024:
        raise UserError(f"--vram is your card's memory in GiB, such as 12 or 23.5; got {text!r}.")
    return value


# Third-party start-up warnings about code we never run. On a CPU with AVX512-BF16 (Zen 4, Sapphire
# Rapids) `import bitsandbytes`, which diffusers does, tries to fetch a CPU 4-bit GEMM from the Hub through
# Hugging Face's `kernels` (a dependency of transformers 5.25+) and logs two warnings when it cannot
# ("Failed to load CPU gemm_4bit_forward ... pip install kernels"): the first lines of every run, about a
# 4-bit CPU path this tool does not use. Errors still show.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def quiet_third_party() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (errors.py lists them)."""
    from .progress import error_console, safe_streams, styled

    argv = list(sys.argv[1:] if argv is None else argv)
    safe_streams()
    quiet_third_party()
    args = build_parser().parse_args(argv)
    args.argv = argv
    err = error_console()
    try:
        if args.command not in ("train", "demo"):
            return args.func(args)
        from .distributed import launched

        with launched():  # under torchrun, this process's rank of the job (a no-op otherwise)
            return args.func(args)
    except UserError as exc:
        if getattr(exc, "said_by_main", False):  # rank 0 of the job printed the same paragraph
            return exc.exit_code
        err.print(styled("error:", str(exc), "bold red"), soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # a second Ctrl-C, or one outside the training loop
        err.print(styled("interrupted.", str(exc) if isinstance(exc, Stopped) else "", "bold red"), soft_wrap=True)
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
