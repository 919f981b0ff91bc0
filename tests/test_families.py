"""The family seam (lowvram_dopsd/families): every registered adapter is complete for the code that asks
it, its published configs are the ones it loads, an unknown family is an error everywhere, and nothing
outside families/ compares a family's name."""
import json
import re
from pathlib import Path

import pytest

from lowvram_dopsd import plan
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.families import family_class_of, family_named, family_of_index, published_dir, registered
from lowvram_dopsd.files import pipeline_index

PACKAGE = Path(__file__).resolve().parents[1] / "lowvram_dopsd"
FAMILIES = registered()
PLANNED = [cls for cls in FAMILIES if cls.k_block]


def test_families_are_told_apart_by_name_and_pipeline():
    assert len({cls.name for cls in FAMILIES}) == len({cls.pipeline_class for cls in FAMILIES}) == len(FAMILIES)
    for cls in FAMILIES:
        assert family_named(cls.name) is cls and family_of_index({"_class_name": cls.pipeline_class}) is cls
        assert cls.teachers and cls.default_rollout_steps > 0 and cls.lora_targets
    assert family_named("sdxl") is None and family_of_index({"_class_name": "StableDiffusionXLPipeline"}) is None
    assert {cls.name for cls in PLANNED} >= {"zimage", "klein"}


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.name)
def test_published_configs_are_the_familys_own(cls):
    """Each public id of a family has its configs in the package, and they describe that family's model."""
    for model_id in cls.hf_repo_ids:
        folder = published_dir(model_id)
        assert folder is not None and folder.name == model_id.replace("/", "--")
        assert family_of_index(pipeline_index(folder)) is cls and family_class_of(model_id) is cls
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        assert transformer["_class_name"] == cls.transformer_class
        if cls.k_block:
            assert plan.resolve_model(model_id).family is cls  # planned offline, from these files
    assert published_dir("someone/not-a-family-id") is None


@pytest.mark.parametrize("cls", PLANNED, ids=lambda c: c.name)
def test_planner_numbers_cover_the_models_block_lists(cls):
    """The planner's block streams name every block list of the real model (built on `meta` from the
    published config), each has a measured k_block, and the tiny model measures those same kinds."""
    mc = plan.resolve_model(cls.hf_repo_ids[0])
    counts = plan.count(plan.build_meta(cls, mc.transformer), cls.quant_skip, cls.lora_targets, rank=4)
    tok = cls.plan_tokens(1024, 768, 512, 512, cls.teachers[0])
    streams = cls.block_streams(counts.blocks, tok)
    assert {name for name, n, _ in streams if n} == set(counts.blocks) - set(cls.teacher_only_blocks) == set(cls.k_block)
    assert set(cls.teacher_only_blocks) <= set(counts.blocks)  # FLUX.3's reference blocks: the teacher's alone
    assert all(0 < t <= tok.student for _, _, t in streams)
    assert tok.student > tok.img >= 3072 and tok.teacher >= tok.img
    assert 0 < cls.c_fwd_fused <= cls.c_fwd
    measured = plan.measure_block_activations(cls, dim_heads=1, tokens=32, text=16, rank=2)
    assert measured and set(measured) <= set(cls.k_block)


def test_a_family_without_planner_numbers_is_not_planned(tmp_path):
    """The toy family trains but has no planner numbers: `plan` says which checkpoints it knows."""
    toy = family_named("toy")
    assert not toy.k_block
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": toy.pipeline_class}))
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="the planner knows .*(ZImagePipeline|Flux2KleinPipeline)"):
        plan.resolve_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionXLPipeline checkpoint; the planner knows"):
        plan.resolve_model(str(tmp_path))


def test_comfy_export_asks_the_family_for_its_layout(tmp_path, capsys):
    """A LoRA of a family without a ComfyUI layout (the toy) or of no family is refused, naming the
    families that have one."""
    from safetensors.torch import save_file
    import torch

    from lowvram_dopsd.cli import main

    with_layout = sorted(cls.name for cls in FAMILIES if cls.comfy_layout is not None)
    assert {"zimage", "klein"} <= set(with_layout) and family_named("toy").comfy_layout is None
    for family in ("toy", "sdxl"):
        path = tmp_path / f"{family}.safetensors"
        save_file({"transformer.a.lora_A.weight": torch.zeros(1, 1), "transformer.a.lora_B.weight": torch.zeros(1, 1)},
                  str(path), metadata={"lowvram_dopsd": json.dumps({"family": family})})
        assert main(["export", "--format", "comfyui", str(path)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"is a LoRA of the {family} family" in err and all(name in err for name in with_layout)


def name_comparisons(root: Path) -> list[str]:
    """Lines under `root` (families/ excepted) that branch on a family's name."""
    names = "|".join(re.escape(cls.name) for cls in FAMILIES)
    literal = re.compile(rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    attribute = re.compile(r"""family\w*(\.name|\[["']family["']\])\s*(==|!=|in\b|not\s+in\b)""")
    return [f"{p.relative_to(root.parent)}:{i}: {line.strip()}"
            for p in sorted(root.rglob("*.py")) if "families" not in p.relative_to(root).parts
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if attribute.search(line) or ("family" in line and literal.search(line))]


def test_nothing_outside_families_compares_a_family_name():
    """Model-specific behaviour lives in the adapters: no module outside families/ branches on a name."""
    for root in (PACKAGE, PACKAGE.parent / "benchmarks"):
        assert not name_comparisons(root), name_comparisons(root)
