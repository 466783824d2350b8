"""Models logged by an earlier smolora_mlflow still load and predict.

``fixtures/model_logged_by_0.1.0_flat_layout`` was saved with ``flavor.save_model`` by the package as it was
before the sub-package layout (commit b1801c2: ``smolora_mlflow/flavor.py``, ``_flavor_files.py``, ...), from
the demo model, and carries that code in ``code/``. Its MLmodel names ``loader_module: smolora_mlflow.flavor``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow

from smolora_mlflow.models.generation import generate
from smolora_mlflow.models.pretrained import load_causal_lm, load_tokenizer

LEGACY = Path(__file__).parent / "fixtures" / "model_logged_by_0.1.0_flat_layout"
PROMPTS = ["The food was", "Our waiter"]


def _copy(tmp_path) -> Path:
    dst = tmp_path / "legacy"
    shutil.copytree(LEGACY, dst)
    return dst


def _native(model_dir: Path) -> list[str]:
    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir)).eval()
    return generate(model, tok, PROMPTS, max_new_tokens=8)


def test_a_model_logged_before_the_layout_change_loads_with_the_installed_package(tmp_path):
    path = _copy(tmp_path)
    model = mlflow.pyfunc.load_model(str(path))
    out = model.predict({"prompt": PROMPTS}, params={"max_new_tokens": 8})
    assert list(out["generated_text"]) == _native(path / "model")
    # The installed package served it: its flavor lives in the new sub-package.
    import smolora_mlflow.flavor as flavor

    assert Path(flavor.__file__).parts[-2:] == ("flavor", "__init__.py")


def test_a_model_logged_before_the_layout_change_loads_in_a_fresh_process_with_its_own_code(tmp_path):
    path = _copy(tmp_path)
    script = (
        "import json, sys, mlflow\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = m.predict({'prompt': json.loads(sys.argv[2])}, params={'max_new_tokens': 8})\n"
        "import smolora_mlflow.flavor as f\n"
        "print(json.dumps({'out': list(out['generated_text']), 'flavor': f.__file__}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = subprocess.run([sys.executable, "-c", script, str(path), json.dumps(PROMPTS)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["out"] == _native(path / "model")
    assert Path(result["flavor"]).resolve() == (path / "code" / "smolora_mlflow" / "flavor.py").resolve()
