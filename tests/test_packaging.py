"""The kernels folder ships as `lowvram_dopsd.kernels` and never stands in for a top-level `kernels` module."""
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
OURS = ROOT / "kernels"
# what `import kernels` gives: the file of Hugging Face's package, "none" where nothing of that name can
# be imported, "no file" for a module without one (what transformers reads as "not installed")
_WHICH = ("try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('none', e.name)\n"
          "else:\n    print(getattr(kernels, '__file__', None) or 'no file')\n")


def _hf_kernels() -> str:
    """`import kernels` from a folder outside the repository: HF's package file, or 'none kernels'."""
    out = subprocess.run([sys.executable, "-c", _WHICH], cwd=Path(sys.prefix), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _from_root() -> str:
    """The same where it is installed; where it is not, a module with no file (transformers <= 5.24 imports
    what find_spec finds when there is no such distribution, and takes a module without a file or a
    version for a folder that shadows nothing)."""
    hf = _hf_kernels()
    return "no file" if hf == "none kernels" else hf


def test_top_level_kernels_is_not_ours(tmp_path):
    out = subprocess.run([sys.executable, "-c", _WHICH], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert not Path(out.stdout.strip()).is_relative_to(OURS), out.stdout


def test_run_from_the_repository_root_imports_hf_kernels(tmp_path):
    """Python started in a clone puts its root first on sys.path (`python -m pytest`, a REPL, a notebook),
    where our kernels/ folder is a package named `kernels`. transformers 5.25+ requires Hugging Face's
    `kernels` and imports it at start-up, so diffusers' pipelines failed to import there
    ("cannot import name 'CUDAProperties' from 'kernels'"). kernels/__init__.py hands the name over."""
    out = subprocess.run([sys.executable, "-c", _WHICH], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _from_root()
    # the root spelled through a link (and twice) on PYTHONPATH: still handed over, not loaded again
    link = tmp_path / "clone"
    link.symlink_to(ROOT, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(link), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", _WHICH], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == _from_root(), out.stderr[-2000:]
    # `kernels` imported first (bitsandbytes and transformers do), then looked up again by diffusers' check
    code = ("import importlib.util, kernels; importlib.util.find_spec('kernels'); import transformers.modeling_utils; "
            "from diffusers import ZImagePipeline, Flux2KleinPipeline; import lowvram_dopsd.kernels.lora_linear; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_kernels_and_presets_import_under_our_namespace(tmp_path):
    code = "import lowvram_dopsd.kernels, lowvram_dopsd.presets, lowvram_dopsd.cli; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
