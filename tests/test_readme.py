"""The README's usage example runs as pasted: its Python block is executed unchanged in a fresh folder."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use it in your own Trainer", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_example_runs_as_pasted_and_reloads_the_compressed_model(tmp_path, minilm_dir):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    # A fresh interpreter, as a reader would run it; this checkout's package, one thread on the shared CPU.
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = (tmp_path / "out" / "compressed" / "config.json").read_text()
    assert '"quant_method": "rankdyna"' in saved
    logits_line = result.stdout.strip().splitlines()[-1]
    params = int(logits_line.rsplit(" ", 1)[1])
    assert params < 22_713_986  # fewer parameters than the dense MiniLM classifier
