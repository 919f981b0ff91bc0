import pytest

from lowvram_dopsd.config import TrainConfig, load_config, preset_names
from lowvram_dopsd.errors import UserError


def test_shipped_presets_validate_and_differ():
    assert {"16gb", "24gb", "cpu-demo"} <= set(preset_names())
    p16, p24 = load_config("16gb"), load_config("24gb")
    assert p16.quant != "none" and p16.optimizer == "adamw8bit"  # the 16 GB levers are on
    assert p24.quant == "none"
    assert p16.resolution == p24.resolution == 1024


def test_paper_defaults_where_preset_is_silent():
    cfg = TrainConfig()
    assert (cfg.rank, cfg.alpha, cfg.ema_decay, cfg.steps, cfg.batch_size) == (64, 128.0, 0.9999, 1000, 4)
    assert cfg.resolved_lr(4e-5) == 4e-5 and cfg.resolved_lr(1e-5) == 1e-5


def test_unknown_key_names_key_and_suggests(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text('learning_rat = 1e-4\n')
    with pytest.raises(UserError) as err:
        load_config(str(bad))
    msg = str(err.value)
    assert "learning_rat" in msg and "Valid settings" in msg and "rank" in msg


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match="Did you mean 'steps'"):
        load_config("16gb", {"stepz": "5"})


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError) as err:
        load_config("8gb")
    assert "16gb" in str(err.value) and "24gb" in str(err.value)


def test_overrides_are_typed_and_beat_the_preset():
    cfg = load_config("16gb", {"steps": "12", "lr": "1e-5", "grad_checkpointing": "false", "lora_targets": "a.b, c"})
    assert cfg.steps == 12 and cfg.lr == 1e-5 and cfg.grad_checkpointing is False
    assert cfg.lora_targets == ["a.b", "c"]


@pytest.mark.parametrize("key,value", [("steps", "many"), ("steps", "1.5"), ("grad_checkpointing", "maybe"),
                                       ("loss", "l1"), ("batch_size", "0"), ("ema_decay", "1.0"),
                                       ("resolution", "1000")])
def test_bad_values_are_rejected(key, value):
    with pytest.raises(UserError):
        load_config(None, {key: value})


@pytest.mark.parametrize("key,value,says", [
    ("lr", "-1e-4", "'lr' must be 0 or more"), ("prior_weight", "-1", "'prior_weight' must be 0 or more"),
    ("weight_decay", "-0.01", "'weight_decay' must be 0 or more"),
    ("warmup_steps", "-5", "'warmup_steps' must be 0 or more"), ("max_grad_norm", "-1", "0 = no clipping"),
    ("keep_checkpoints", "-1", "0 = keep all"), ("train_states", "-2", "0 = all of them"),
    ("lr", "nan", "must be a finite number"), ("alpha", "inf", "must be a finite number"),
    ("steps", "1.5", "'steps' in the command line must be a whole number such as 4, got '1.5'"),
    ("grad_checkpointing", "maybe", "must be true or false"),
    ("vlm_max_pixels", "0", "positive"), ("vlm_min_pixels", str(2048 * 2048), "above vlm_max_pixels"),
])
def test_values_that_mean_nothing_are_rejected_saying_what_zero_means(key, value, says):
    with pytest.raises(UserError, match=says):
        load_config(None, {key: value})
    if "0 or more" in says or key == "lr":
        assert getattr(load_config(None, {key: "0"}), key) == 0  # and 0 itself is valid


def test_batch_must_divide_into_micro_batches():
    with pytest.raises(UserError, match="multiple of micro_batch"):
        load_config(None, {"batch_size": "4", "micro_batch": "3"})


def test_int8_activations_need_an_int8_base():
    from lowvram_dopsd.config import load_config
    from lowvram_dopsd.errors import UserError

    assert load_config("16gb", {"act_quant": "int8"}).act_quant == "int8"  # 16gb is qint8
    for quant in ("none", "qfloat8", "bnb-int8"):
        with pytest.raises(UserError, match="needs quant = 'qint8'"):
            load_config("16gb", {"act_quant": "int8", "quant": quant})
    with pytest.raises(UserError, match="act_quant"):
        load_config("16gb", {"act_quant": "fp4"})


def test_every_setting_is_documented_and_grouped():
    from dataclasses import fields

    fs = fields(TrainConfig)
    assert fs[0].metadata["section"], "the first setting opens a group"
    for f in fs:
        assert len(f.metadata["help"]) > 10, f"{f.name} has no help text"


def test_choices_are_the_settings_own_and_validated():
    from dataclasses import fields

    from lowvram_dopsd.config import CHOICES

    assert CHOICES["quant"] == ("none", "qint8", "qfloat8", "bnb-int8") and "rank" not in CHOICES
    for f in fields(TrainConfig):
        if f.metadata["choices"]:
            assert getattr(TrainConfig(), f.name) in f.metadata["choices"]  # the default is a valid value
            with pytest.raises(UserError, match=f"'{f.name}' is 'bogus'; it must be one of"):
                load_config(None, {f.name: "bogus"})


def test_every_setting_is_read_by_the_trainer():
    """A setting nothing reads (log_every was one) would let a user change a value that does nothing."""
    import re
    from dataclasses import fields
    from pathlib import Path

    import lowvram_dopsd

    pkg = Path(lowvram_dopsd.__file__).parent
    src = "\n".join(p.read_text(encoding="utf-8") for p in pkg.rglob("*.py") if p.name != "config.py")
    # config.py validates every setting (not a read); the accessors it gives the trainer (resolved_lr,
    # grad_accum) read theirs as self.<name>
    own = (pkg / "config.py").read_text(encoding="utf-8")
    unread = [f.name for f in fields(TrainConfig)
              if not re.search(rf"\bcfg\.{f.name}\b", src) and not re.search(rf"\bself\.{f.name}\b", own)]
    assert unread == []


def test_a_preset_file_builds_on_a_base_chain(tmp_path):
    """base = a shipped name or a path relative to the file naming it; each file overrides its base."""
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "base.toml").write_text('description = "ours"\nbase = "16gb"\nrank = 32\nalpha = 32.0\n')
    mine = tmp_path / "mine.toml"
    mine.write_text('description = "mine"\nbase = "team/base.toml"\nalpha = 16.0\nsteps = 500\n')
    cfg = load_config(str(mine), {"steps": "600"})
    assert (cfg.quant, cfg.optimizer, cfg.rank, cfg.alpha, cfg.steps) == ("qint8", "adamw8bit", 32, 16.0, 600)
    # the resolved config is what a checkpoint saves and `--resume` compares: the same as the flags would give
    assert cfg.to_dict() == load_config("16gb", {"rank": "32", "alpha": "16", "steps": "600"}).to_dict()
    (tmp_path / "team" / "base.toml").write_text('base = "16gb"\nrnak = 32\n')
    with pytest.raises(UserError, match=r"Unknown setting 'rnak' in .*base\.toml"):  # names the file that has it
        load_config(str(mine))


def test_a_base_loop_or_an_unknown_base_is_a_clear_error(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text(f'base = "../{tmp_path.name}/a.toml"\n')  # the same file, spelled another way
    with pytest.raises(UserError, match=r"loop: .*a\.toml -> .*b\.toml -> .*a\.toml\. Remove one"):
        load_config(str(tmp_path / "a.toml"))
    (tmp_path / "a.toml").write_text('base = "8gb"\n')
    with pytest.raises(UserError, match=r"Unknown preset '8gb' \(the base of .*a\.toml\)\. Shipped presets: .*16gb"):
        load_config(str(tmp_path / "a.toml"))
    (tmp_path / "a.toml").write_text('base = 16\n')
    with pytest.raises(UserError, match="'base' in .* must be a shipped preset's name"):
        load_config(str(tmp_path / "a.toml"))


def test_a_setting_is_written_as_its_flag_where_it_has_one():
    from lowvram_dopsd.config import as_argument

    assert as_argument("rank", 64) == "--rank 64" and as_argument("model", "/my models/z") == "--model '/my models/z'"
    assert as_argument("prior_prompts", ["a dog", "a cat"]) == "--set 'prior_prompts=a dog|a cat'"  # no flag
    assert as_argument("teacher", "") == "--teacher ''"
    assert as_argument("preview_teacher", True) == "--set preview_teacher=true"


def test_full_fine_tuning_refuses_what_has_no_meaning_without_a_frozen_base():
    """train_mode = 'full' trains every weight: an 8-bit frozen base (the 16gb preset's), LoRA-only settings and
    fp16 are refused in one paragraph that says what to change."""
    with pytest.raises(UserError, match=r"quant = 'qint8' makes the frozen base 8-bit, but with train_mode = 'full' "
                                        r"nothing is frozen.*Set quant = 'none' \(--quant none\).*full-\* preset"):
        load_config("16gb", {"train_mode": "full"})
    with pytest.raises(UserError, match=r"prior_prompts is not available with train_mode = 'full' \(their target is "
                                        r"the bare base"):
        load_config("24gb", {"train_mode": "full", "prior_prompts": "a photo of a dog"})
    with pytest.raises(UserError, match=r"fp16 gradients .* Set --dtype bf16"):
        load_config("24gb", {"train_mode": "full", "dtype": "fp16"})
    with pytest.raises(UserError, match=r"ema_dtype = 'bf16' is the full fine-tune's setting"):
        load_config("24gb", {"ema_dtype": "bf16"})
    assert load_config("24gb", {"train_mode": "full"}).train_mode == "full"  # a bf16 base: nothing to refuse


def test_full_fine_tuning_refuses_a_batch_its_processes_cannot_share(monkeypatch):
    import torch

    from lowvram_dopsd import distributed, preflight

    monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank=0, size=2))
    cfg = load_config("cpu-demo", {"train_mode": "full", "batch_size": "3"})
    with pytest.raises(UserError, match=r"batch_size / micro_batch = 3 does not divide among 2 processes\. Set "
                                        r"--batch-size to a multiple of 2"):
        preflight.check_device(cfg, torch.device("cpu"))
    preflight.check_device(load_config("cpu-demo", {"batch_size": "3"}), torch.device("cpu"))  # LoRA: runs unevenly


def test_full_fine_tuning_on_an_8_bit_base_is_refused_once_in_the_run_s_own_terms():
    """The paragraph named bf16 on an fp32 run and said 'train a LoRA ... train_mode = lora' twice."""
    with pytest.raises(UserError) as refused:
        load_config("cpu-demo", {"train_mode": "full", "quant": "qint8"})
    said = str(refused.value)
    assert "computed in fp32" in said and said.count("train_mode = 'lora'") == 1, said
