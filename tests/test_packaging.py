"""The kernels folder ships as `lowvram_dopsd.kernels`, never as a top-level `kernels` module."""
import subprocess
import sys


def test_top_level_kernels_is_not_ours(tmp_path):
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print('none' if spec is None else spec.origin)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin == "none" or "lowvram" not in origin.lower(), origin


def test_kernels_and_presets_import_under_our_namespace(tmp_path):
    code = "import lowvram_dopsd.kernels, lowvram_dopsd.presets, lowvram_dopsd.cli; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
