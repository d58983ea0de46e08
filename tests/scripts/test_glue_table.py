import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(REPO / "scripts"))  # glue_table imports run_glue as a sibling module
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method,signal", [("rankdyna", "gate"), ("rankdyna_sv_grad", "singular_value")])
def test_each_row_is_a_valid_run_glue_command_with_its_scoring_signal(method, signal, tmp_path, glue_dir):
    glue_table = _load_script("glue_table")
    argv = glue_table.run_argv("sst2", method, 0.33, glue_dir, str(tmp_path), ["--num_train_epochs", "1"])
    _, _, rankdyna_args, _, _ = glue_table.run_glue.parse_args(argv)
    config = rankdyna_args.to_config()
    assert config.target_budget == 0.33
    assert config.singular_value_signal == signal


def test_dense_row_has_no_compression_flags(tmp_path, glue_dir):
    glue_table = _load_script("glue_table")
    argv = glue_table.run_argv("rte", "dense", 0.5, glue_dir, str(tmp_path), [])
    assert not any(a.startswith("--rankdyna") for a in argv)
