"""log_with: what is checked before a run starts. What a run logs, and how a resume purges the steps it
redoes, is read back with TensorBoard's own reader in test_resume.py."""
import sys

from lowvram_dopsd.cli import main


def test_a_missing_tensorboard_is_said_before_anything_is_loaded(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when the package is not installed
    out = tmp_path / "out"
    assert main(["train", "--preset", "cpu-demo", "--log-with", "tensorboard", "--images", str(tmp_path / "none"),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorboard" in err and "log_with = 'none'" in err and "Traceback" not in err
    assert not out.exists()  # said before the model, the images or the output folder were touched
