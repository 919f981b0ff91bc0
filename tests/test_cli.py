"""The command line end to end: exit codes, a loadable LoRA, one-paragraph errors."""
import re
import shlex

import pytest
import torch
from diffusers import ZImagePipeline

from lowvram_dopsd.cli import main
from lowvram_dopsd.config import load_config
from lowvram_dopsd.output import read_info


def test_demo_runs_and_writes_a_lora_the_pipeline_loads(tmp_path, monkeypatch, tiny_demo_root, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOWVRAM_DOPSD_DEMO_DIR", str(tiny_demo_root))
    assert main(["demo", "--world", "tiny", "--steps", "2"]) == 0
    out = tmp_path / "dopsd-demo-out"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    info = read_info(out / "pytorch_lora_weights.safetensors")
    assert info["steps"] == 2 and info["family"] == "zimage" and info["teacher"] == "vlm"
    assert "sks" in info["caption_rule"] or info["caption_rule"]
    printed = capsys.readouterr().out
    assert "caption" in printed
    # the closing lines are pasted as printed: the Python line loads the LoRA, the command is one line
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in printed.splitlines()
             if line.startswith(("load it:", "try it:", "ComfyUI:"))}
    scope = {}  # the line imports what it uses
    exec(lines["load it"], scope)
    assert isinstance(scope["pipe"], ZImagePipeline)
    assert scope["pipe"].get_list_adapters()["transformer"]  # our LoRA, in the stock pipeline
    assert shlex.split(lines["ComfyUI"]) == ["lowvram-dopsd", "export", "--format", "comfyui", "dopsd-demo-out"]
    assert shlex.split(lines["try it"])[:4] == ["lowvram-dopsd", "sample", "--lora", "dopsd-demo-out"]


def test_train_on_a_tiny_folder(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images, monkeypatch, capsys,
                                timed_on_4090):
    out = tmp_path / "run"
    monkeypatch.chdir(tiny_zimage_dir.parent)  # --model typed as a relative path
    monkeypatch.setattr("lowvram_dopsd.progress.LONG_RUN_S", 0)  # any run is "long": the note's wiring
    code = main(["train", "--preset", "cpu-demo", "--model", tiny_zimage_dir.name, "--teacher-encoder",
                 str(tiny_vlm_dir), "--images", str(demo_images), "--output", str(out), "--steps", "4",
                 "--cache-dir", str(tmp_path / "cache"), "--set", "train_states=2", "--loss", "velocity"])
    assert code == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    # after step 3, once, with the levers this config has left (it already trains 2 states per roll-out)
    printed = " ".join(capsys.readouterr().out.split())  # the note may wrap at the console's width
    assert printed.count("What shortens it") == 1 and "the step left takes about 0 h" in printed
    # before the first step: the attention kernel of each pass, the time planner's prediction
    assert "attention: native backend; teacher: " in printed and ", student: " in printed
    assert printed.count("time on the RTX 4090 (predicted, not measured): ") == 1
    note = printed[printed.index("What shortens it"):printed.index("How long will it take?")]
    assert note.startswith("What shortens it: fewer --steps") and "--train-states" not in note
    info = read_info(out / "pytorch_lora_weights.safetensors")
    assert info["loss"] == "velocity"
    assert info["base_model"] == str(tiny_zimage_dir.resolve())  # `sample` finds it from any folder


def test_bad_input_is_one_clear_paragraph_and_exit_2(tmp_path, capsys):
    code = main(["train", "--preset", "cpu-demo", "--images", str(tmp_path / "nope"), "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_unknown_repo_id_names_what_to_download(tmp_path, monkeypatch, capsys, demo_images):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code = main(["train", "--preset", "cpu-demo", "--images", str(demo_images), "--model", "someone/NotAModel"])
    err = capsys.readouterr().err
    assert code == 2 and "hf download someone/NotAModel" in err


def test_unknown_setting_and_unknown_preset(capsys):
    assert main(["train", "--preset", "cpu-demo", "--set", "ranks=8"]) == 2
    assert "Did you mean 'rank'" in capsys.readouterr().err
    assert main(["train", "--preset", "12gbb"]) == 2
    assert "16gb" in capsys.readouterr().err


def test_act_quant_flag_is_a_setting_with_a_clear_error(capsys):
    assert main(["train", "--preset", "cpu-demo", "--act-quant", "int8"]) == 2  # cpu-demo: quant = none
    err = capsys.readouterr().err
    assert "needs quant = 'qint8'" in err and "--act-quant off" in err and "Traceback" not in err


def test_header_shows_square_brackets_literally(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images, capsys):
    main(["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--teacher-encoder", str(tiny_vlm_dir),
          "--images", str(demo_images), "--output", str(tmp_path / "o"), "--steps", "1", "--trigger", "sks ball",
          "--cache-dir", str(tmp_path / "cache")])
    assert "[trigger]" in capsys.readouterr().out  # the caption rule names the placeholder


def test_a_caption_the_pipeline_would_cut_is_warned_before_training(tmp_path, tiny_zimage_dir, tiny_vlm_dir,
                                                                     demo_images, capsys):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(demo_images, images)
    first = sorted(images.glob("*.txt"))[0]
    first.write_text("a photo of sks ball " + "on a long sandy beach under a bright sky " * 12)
    code = main(["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--teacher-encoder",
                 str(tiny_vlm_dir), "--images", str(images), "--output", str(tmp_path / "o"), "--steps", "1",
                 "--cache-dir", str(tmp_path / "cache")])
    cap = capsys.readouterr()
    out = " ".join((cap.out + cap.err).split())  # rich wraps long lines
    assert code == 0 and "1 of 6 caption prompts" in out, out
    assert "longer than max_sequence_length = 64" in out and first.with_suffix(".png").name in out


def test_train_help_documents_each_flag_from_its_setting(capsys):
    import dataclasses

    from lowvram_dopsd.cli import FLAGS
    from lowvram_dopsd.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    docs = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    for flag, key in FLAGS.items():
        assert " ".join(docs[key]["help"].split()[:4]) in out, flag
        if docs[key]["choices"]:
            assert f"{flag} {{" + ",".join(c or "''" for c in docs[key]["choices"]) + "}" in out
    assert "(default: 'x0')" in out and "lowvram-dopsd settings" in out


@pytest.mark.parametrize("flag,value,expected", [("--lr-schedule", "cosine", "cosine"), ("--warmup-steps", "25", 25),
                                                 ("--preview-every", "0", 0), ("--rank", "16", 16)])
def test_a_named_flag_sets_its_setting_over_the_preset(flag, value, expected):
    from lowvram_dopsd.cli import FLAGS, _overrides, build_parser

    args = build_parser().parse_args(["train", "--preset", "16gb", flag, value])
    cfg = load_config(args.preset, _overrides(args))
    assert getattr(cfg, FLAGS[flag]) == expected
    assert getattr(load_config("16gb", {}), FLAGS[flag]) != expected  # the flag, not the preset, set it


@pytest.mark.parametrize("columns", [200, 80])  # value beside its description / above it
def test_settings_lists_every_setting_with_its_resolved_value(capsys, monkeypatch, columns):
    import dataclasses

    from lowvram_dopsd.config import TrainConfig

    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["settings", "--preset", "16gb", "--rank", "32", "--set",
                 "preview_prompts=[trigger] dog|[b]cat[/b]"]) == 0
    out = capsys.readouterr().out
    # a setting's row starts with two spaces and its name; wrapped text is indented further
    rows, name = {}, None
    for line in out.splitlines():
        if line.startswith("  ") and line[2] != " ":
            name = line.split()[0]
            rows[name] = line
        elif line.startswith("   ") and name:
            rows[name] += "\n" + line
        else:
            name = None  # a group's title
    assert set(rows) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert rows["quant"].split()[1] == "qint8" and rows["rank"].split()[1] == "32"  # preset, then flag
    assert "[trigger] dog|[b]cat[/b]" in rows["preview_prompts"] and "--rank" in rows["rank"]  # as typed
    assert max(map(len, out.splitlines())) <= columns
    assert main(["settings", "--preset", "16gb", "--set", "rnak=3"]) == 2  # same checks as train


def test_a_setting_given_by_its_flag_and_by_set_is_refused(capsys):
    assert main(["settings", "--steps", "100", "--set", "steps=200"]) == 2
    assert "'steps' is set twice: --steps 100 and --set steps=200" in capsys.readouterr().err
    assert main(["settings", "--steps", "100", "--set", "steps=100"]) == 0  # the same value twice is harmless
    assert main(["settings", "--lr", "1e-4", "--set", "lr=0.0001"]) == 0  # the same number, written two ways


def test_a_setting_given_twice_by_set_with_two_values_is_refused(capsys):
    assert main(["settings", "--set", "rank=32", "--set", "rank=64"]) == 2
    assert "'rank' is set twice: --set rank=32 and --set rank=64. Keep one of them." in capsys.readouterr().err
    assert main(["settings", "--set", "lr=1e-4", "--set", "lr=0.0001"]) == 0  # the same value, typed two ways
    assert main(["settings", "--set", "rnak=3", "--set", "rnak=4"]) == 2  # an unknown key: the usual suggestion
    assert "Did you mean 'rank'" in capsys.readouterr().err


def test_settings_says_what_the_models_default_is(capsys, monkeypatch, tmp_path):
    """lr 0 and teacher '' mean "the model's own": settings names the value for the model at hand."""
    monkeypatch.setenv("COLUMNS", "200")
    rows = {}
    for model in ("black-forest-labs/FLUX.2-klein-4B", "Tongyi-MAI/Z-Image-Turbo", str(tmp_path / "unknown")):
        assert main(["settings", "--model", model]) == 0
        rows[model] = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    klein, zimage, unknown = rows.values()
    assert "0.0 = 1e-05 (klein)" in klein["lr"] and "'' = edit (klein)" in klein["teacher"]
    assert "0 = 4 (klein)" in klein["rollout_steps"]
    assert "0.0 = 4e-05 (zimage)" in zimage["lr"] and "'' = vlm (zimage)" in zimage["teacher"]
    assert "=" not in unknown["lr"].split("learning rate")[0]  # a model it cannot read offline: no guess


def test_the_cli_hides_bitsandbytes_start_up_warning_about_its_cpu_4bit_gemm():
    """`import bitsandbytes` (diffusers does it) on an AVX512-BF16 CPU logs that it could not fetch a CPU
    4-bit GEMM from the Hub, at every start; a run of the CLI hides that, and still shows errors."""
    import os
    import subprocess
    import sys

    from bitsandbytes.functional import has_avx512bf16

    run = ("from lowvram_dopsd import cli; {}import diffusers, bitsandbytes, logging; "
           "logging.getLogger('bitsandbytes.backends.cpu.ops').error('an error still shows')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bare, quiet = (subprocess.run([sys.executable, "-c", run.format(call)], capture_output=True, text=True, env=env)
                   for call in ("", "cli.main(['presets']); "))
    assert bare.returncode == quiet.returncode == 0, bare.stderr + quiet.stderr
    assert "an error still shows" in bare.stderr and "an error still shows" in quiet.stderr
    assert "gemm_4bit_forward" not in quiet.stderr and "publisher trust" not in quiet.stderr, quiet.stderr
    if has_avx512bf16():  # the CPUs where bitsandbytes tries (this one, here); elsewhere it stays silent
        assert "gemm_4bit_forward" in bare.stderr, bare.stderr


def test_version(capsys):
    from lowvram_dopsd import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith(f"lowvram-dopsd {__version__} (python ") and "torch " in out
    assert out.count("\n") == 1


@pytest.mark.parametrize("name", ["my [dataset].toml", "x[/].toml", "[bold]a[/bold].toml"])
def test_an_error_shows_the_users_text_and_ours_as_typed(tmp_path, tiny_zimage_dir, capsys, name):
    """Rich markup used to eat the brackets of a path and of our own "[[folders]]", and a "[/]" in a path
    raised a MarkupError instead of the message."""
    (tmp_path / name).parent.mkdir(exist_ok=True)  # "x[/].toml": the file "].toml" in the folder "x["
    (tmp_path / name).write_text("")
    assert main(["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--images", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert f"The dataset file '{tmp_path / name}' lists no folders" in err and "one [[folders]] table" in err
    assert "Traceback" not in err and err.startswith("error: ")


def test_ctrl_c_outside_a_run_gives_no_advice_to_resume(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("lowvram_dopsd.cli.cmd_presets", interrupted)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "interrupted.\n"


def test_demo_help_shows_the_demos_defaults(capsys):
    from lowvram_dopsd.cli import build_parser

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "optimizer steps to train (default: 300; --world tiny: 20)" in out  # not train's 1000
    assert "metrics.jsonl (default: 'dopsd-demo-out')" in out and "(default: 'out')" not in out
    assert "(default: 'toy'; --world tiny: 'cpu-demo')" in out
    assert build_parser().parse_args(["demo"]).world == "toy"  # the default world is the one that learns


@pytest.mark.parametrize("started, on_path, expected", [
    ("venv/bin/lowvram-dopsd", False, ["{tmp}/venv/bin/lowvram-dopsd"]),  # scripts/demo.sh's: not on PATH
    ("venv/bin/lowvram-dopsd", True, ["lowvram-dopsd"]),
    ("lowvram_dopsd/__main__.py", False, ["{python}", "-m", "lowvram_dopsd"]),  # python -m lowvram_dopsd
    ("pytest", False, ["lowvram-dopsd"]),  # called from Python code: the name the docs use
])
def test_commands_to_copy_start_with_a_program_the_shell_finds(monkeypatch, tmp_path, started, on_path, expected):
    import sys

    from lowvram_dopsd import progress

    script = tmp_path / started
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [started])  # relative, as a shell may pass it
    monkeypatch.setenv("PATH", str(script.parent) if on_path else str(tmp_path / "empty"))
    assert progress.program() == [e.format(tmp=tmp_path, python=sys.executable) for e in expected]


def test_the_commands_a_run_prints_start_with_that_program(monkeypatch, tmp_path, tiny_zimage_dir):
    import sys

    from lowvram_dopsd.advice import use_commands
    from lowvram_dopsd.families import load_family

    script = tmp_path / "venv" / "bin" / "lowvram-dopsd"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # as after scripts/demo.sh: .venv/bin is not on PATH
    lines = use_commands(load_config("cpu-demo", {"model": str(tiny_zimage_dir)}), load_family(str(tiny_zimage_dir)),
                         tmp_path / "out")
    assert shlex.split(lines["try it"])[:2] == [str(script), "sample"]
    assert shlex.split(lines["ComfyUI"])[:2] == [str(script), "export"]


def test_demo_sh_runs_where_you_stand(tmp_path):
    """scripts/demo.sh sets the repository up, then runs the demo in the caller's folder: the output folder
    and the paths it prints are relative to where the user stands, not to the repository."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / "scripts" / "demo.sh", repo / "scripts")
    (repo / "scripts" / "setup.sh").write_text("pwd > setup-ran-in\n")
    (repo / ".venv" / "bin").mkdir(parents=True)
    fake = repo / ".venv" / "bin" / "lowvram-dopsd"
    fake.write_text('#!/usr/bin/env bash\necho "$(pwd)|$*"\n')
    fake.chmod(0o755)
    user = tmp_path / "somewhere else"
    user.mkdir()
    done = subprocess.run(["bash", str(repo / "scripts" / "demo.sh"), "--steps", "3"], cwd=user, capture_output=True,
                          text=True, env={**os.environ, "PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{user}|demo --steps 3\n"
    assert (repo / "setup-ran-in").read_text().strip() == str(repo)


def test_presets_line_up_every_name_with_its_description(capsys):
    """Names longer than 10 characters (full-1x80gb) pushed their descriptions out of the column."""
    from lowvram_dopsd.config import preset_names

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {len(re.match(r"\S+ +", line).group()) for line in lines[::2]}
    assert len(lines) == 2 * len(preset_names()) and len(starts) == 1, lines
    assert {len(line) - len(line.lstrip()) for line in lines[1::2]} == starts


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_plan_refuses_a_gpu_count_below_one(mode, capsys):
    """plan --gpus 0 planned one GPU's LoRA run (or full mode's preset count) as if nothing was asked."""
    assert main(["plan", "--train-mode", mode, "--gpus", "0"]) == 2
    assert capsys.readouterr().err == "error: --gpus is how many GPUs to train on (1 or more); got 0.\n"
