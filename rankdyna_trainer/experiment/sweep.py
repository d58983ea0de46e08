"""One search space for both sweep engines: a W&B sweep YAML, read by ``wandb sweep`` and turned here into an
optuna search space for ``Trainer.hyperparameter_search(backend="optuna")`` when no W&B server is around."""

from __future__ import annotations

from typing import Any, Callable

import yaml


def read_sweep_config(path: str) -> dict:
    with open(path) as f:
        sweep = yaml.safe_load(f)
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict) or not sweep["parameters"]:
        raise ValueError(f"{path} is not a W&B sweep configuration: it needs a non-empty 'parameters' mapping.")
    return sweep


def optuna_space(parameters: dict[str, dict]) -> Callable[[Any], dict[str, Any]]:
    """``hp_space`` for optuna from W&B sweep ``parameters``.

    Supported W&B forms: ``value`` (fixed), ``values`` (categorical), and ``min``/``max`` with ``distribution``
    ``uniform``, ``int_uniform`` or ``log_uniform_values`` (inferred as uniform/int_uniform when absent, as W&B does).
    """
    for name, spec in parameters.items():
        _check_spec(name, spec)

    def hp_space(trial) -> dict[str, Any]:
        return {name: _suggest(trial, name, spec) for name, spec in parameters.items()}

    return hp_space


_DISTRIBUTIONS = ("uniform", "int_uniform", "log_uniform_values")


def _distribution(spec: dict) -> str:
    if "distribution" in spec:
        return spec["distribution"]
    return "int_uniform" if isinstance(spec["min"], int) and isinstance(spec["max"], int) else "uniform"


def _check_spec(name: str, spec: Any) -> None:
    if not isinstance(spec, dict):
        raise ValueError(f"Sweep parameter {name!r} must be a mapping (value / values / min+max), got {spec!r}.")
    if "value" in spec or "values" in spec:
        return
    if "min" not in spec or "max" not in spec:
        raise ValueError(f"Sweep parameter {name!r} needs 'value', 'values' or 'min' and 'max'; got {spec}.")
    if _distribution(spec) not in _DISTRIBUTIONS:
        raise ValueError(f"Sweep parameter {name!r} uses distribution {spec['distribution']!r}; the optuna search "
                         f"supports {list(_DISTRIBUTIONS)} (and value/values).")


def _suggest(trial, name: str, spec: dict):
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return trial.suggest_categorical(name, spec["values"])
    low, high = spec["min"], spec["max"]
    distribution = _distribution(spec)
    if distribution == "int_uniform":
        return trial.suggest_int(name, int(low), int(high))
    return trial.suggest_float(name, float(low), float(high), log=distribution == "log_uniform_values")
