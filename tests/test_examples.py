"""Each example in python/ runs as its own program, with small settings, and reports success."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_example(name: str, *args: str) -> str:
    env = dict(os.environ)
    # Works from a checkout whether or not the package is installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    result = subprocess.run([sys.executable, str(REPO / "python" / name), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_custom_model_trains_and_merges():
    out = _run_example("custom_model.py", "--steps", "60", "--width", "32", "--rank", "4")
    assert "merged into nn.Linear: True" in out


def test_transformers_adapter_finetune_merge_save_reload(tmp_path):
    pytest.importorskip("transformers")
    out = _run_example("finetune_transformers.py", "--steps", "12", "--out", str(tmp_path / "model"))
    assert "0 GradNormLoRPLinear left" in out and out.rstrip().endswith("OK")
    assert (tmp_path / "model" / "config.json").exists()


def test_pretrain_llama_script_checkpoints_resumes_and_samples(tmp_path):
    out = _run_example("pretrain_llama.py", "--steps", "8", "--dim", "32", "--layers", "1", "--rank", "8",
                       "--seq-len", "32", "--batch-size", "4", "--out", str(tmp_path))
    assert "checkpointed and resumed at step 4" in out and "greedy sample" in out
    assert (tmp_path / "checkpoint.pt").exists()
