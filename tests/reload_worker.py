"""Reloads saved models in a fresh interpreter, as a user would, and compares their outputs with the expected ones.

    python tests/reload_worker.py MANIFEST.json RESULTS.json [--without-package]

MANIFEST maps a case id to ``{"folder", "auto_class", "io"}`` where ``io`` is a ``torch.save``d ``(inputs, logits)``
pair. With the package (the default): ``import rankdyna_trainer`` then ``AutoModelFor....from_pretrained(folder)``;
the result records the largest output difference and what transformers reports about the load. With
``--without-package`` the package is never imported and the result records how loading failed.
"""

import json
import sys
import traceback


def reload_one(entry: dict) -> dict:
    import torch
    import transformers

    auto_class = getattr(transformers, entry["auto_class"])
    try:
        model, info = auto_class.from_pretrained(entry["folder"], output_loading_info=True)
    except Exception as err:  # the --without-package runs expect this; the others report it
        return {"loaded": False, "error": f"{type(err).__name__}: {err}"}
    inputs, expected = torch.load(entry["io"])
    with torch.no_grad():
        logits = model(**inputs).logits
    return {
        "loaded": True,
        "max_abs_diff": float((logits - expected).abs().max()),
        "same_shape": list(logits.shape) == list(expected.shape),
        "quantizer": type(getattr(model, "hf_quantizer", None)).__name__,
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": sorted(str(k) for k in info["mismatched_keys"]),
        "module_types": sorted({type(model.get_submodule(n)).__name__ for n in entry.get("modules", [])}),
    }


def main(argv: list[str]) -> None:
    manifest_path, results_path = argv[:2]
    if "--without-package" not in argv:
        import rankdyna_trainer  # noqa: F401  (registers the "rankdyna" quantization method)
    with open(manifest_path) as f:
        manifest = json.load(f)
    results = {}
    for case, entry in manifest.items():
        try:
            results[case] = reload_one(entry)
        except Exception:
            results[case] = {"loaded": False, "error": traceback.format_exc()}
    with open(results_path, "w") as f:
        json.dump({"package_imported": "rankdyna_trainer" in sys.modules, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
