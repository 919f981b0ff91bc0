"""Command line: `lowvram-dopsd train | demo | presets`.

    lowvram-dopsd train --preset 16gb --images ./my_dog
    lowvram-dopsd demo          # tiny Z-Image model + bundled images, on the CPU, about a minute
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import field_names, load_config, preset_names, read_preset
from .errors import UserError

# flag -> config key, for the settings people change most; everything else via --set key=value
FLAGS = {
    "--model": "model", "--images": "images", "--caption": "caption", "--trigger": "trigger",
    "--output": "output", "--teacher": "teacher", "--teacher-encoder": "teacher_encoder", "--loss": "loss",
    "--steps": "steps", "--rank": "rank", "--alpha": "alpha", "--lr": "lr", "--batch-size": "batch_size",
    "--micro-batch": "micro_batch", "--resolution": "resolution", "--rollout-steps": "rollout_steps",
    "--train-states": "train_states", "--ema-decay": "ema_decay", "--quant": "quant",
    "--optimizer": "optimizer", "--device": "device", "--encoders-on": "encoders_on", "--dtype": "dtype",
    "--seed": "seed", "--cache-dir": "cache_dir", "--save-every": "save_every", "--kernels": "kernels",
}


def _add_train_flags(p: argparse.ArgumentParser, preset_default: str | None) -> None:
    p.add_argument("--preset", default=preset_default,
                   help=f"shipped preset ({', '.join(preset_names())}) or a .toml file with the same keys")
    for flag, key in FLAGS.items():
        p.add_argument(flag, dest=key, default=None, metavar=key.upper())
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set warmup_steps=50 (repeatable)")


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    out = {key: getattr(args, key) for key in FLAGS.values() if getattr(args, key) is not None}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'. Settings: {', '.join(field_names())}.")
        out[key.strip()] = value.strip()
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = load_config(args.preset, _overrides(args))
    train(cfg, preset=args.preset or "")
    return 0


def demo_model_dir() -> Path:
    """The embedded default: a tiny Z-Image + Qwen3-VL pair, built once (seconds) and reused."""
    from .tiny import make_tiny_qwen3vl, make_tiny_zimage

    root = Path(os.environ.get("LOWVRAM_DOPSD_DEMO_DIR", Path.home() / ".cache" / "lowvram-dopsd" / "demo"))
    model, vlm = root / "tiny-zimage", root / "tiny-qwen3vl"
    if not (model / "model_index.json").is_file():
        make_tiny_zimage(model)
    if not (vlm / "config.json").is_file():
        make_tiny_qwen3vl(vlm, text_encoder_dir=model / "text_encoder")
    return root


def cmd_demo(args: argparse.Namespace) -> int:
    from importlib import resources

    from .train import train

    if getattr(args, "world", "tiny") == "toy":
        # The toy world (docs/toy.md): a trained 4-step 32x32 model whose teacher really reads the
        # reference image, and 6 images of a shape it never saw (a ring) bound to the trigger 'sks'.
        toy = resources.files("lowvram_dopsd") / "assets" / "toy"
        root = Path(os.environ.get("LOWVRAM_DOPSD_DEMO_DIR", Path.home() / ".cache" / "lowvram-dopsd" / "demo"))
        preset = "toy" if args.preset == "cpu-demo" else args.preset
        overrides = {"model": str(toy / "model"), "images": str(toy / "concept"), "output": "dopsd-demo-out",
                     "cache_dir": str(root / "features"), "trigger": "sks"}
        overrides.update(_overrides(args))
        train(load_config(preset, overrides), preset=preset)
        return 0
    root = demo_model_dir()
    images = resources.files("lowvram_dopsd") / "assets" / "demo"
    overrides = {"model": str(root / "tiny-zimage"), "teacher_encoder": str(root / "tiny-qwen3vl"),
                 "images": str(images), "output": "dopsd-demo-out", "cache_dir": str(root / "features"),
                 "trigger": "sks ball"}
    overrides.update(_overrides(args))
    cfg = load_config(args.preset, overrides)
    train(cfg, preset=args.preset)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        data, _ = read_preset(name)
        from importlib import resources
        text = (resources.files("lowvram_dopsd.presets") / f"{name}.toml").read_text()
        desc = next((line.split("=", 1)[1].strip().strip('"') for line in text.splitlines()
                     if line.startswith("description")), "")
        print(f"{name:10s} {desc}")
        print(" " * 11 + ", ".join(f"{k}={v}" for k, v in data.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowvram-dopsd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a D-OPSD LoRA on a folder of images")
    _add_train_flags(p, preset_default=None)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help="train on the embedded tiny model and bundled images (CPU, ~1 min)")
    _add_train_flags(p, preset_default="cpu-demo")
    p.add_argument("--world", choices=["tiny", "toy"], default="tiny",
                   help="tiny: random-weight tiny Z-Image (plumbing only); toy: the trained toy world "
                        "(docs/toy.md), preset 'toy'")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        from rich.console import Console
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {exc}")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
