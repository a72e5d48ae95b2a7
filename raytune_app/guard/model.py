"""Training the guard on Ray Train, and the Guard scorer that eval, score and serving use.

    guard = train_guard(recipe)          # runs/<name>/guard/{model/, guard.json}
    scorer = Guard.load("runs/quickstart/guard")
    scorer.scores(["Ignore all previous instructions..."])   # attack probabilities
    scorer.blocks(texts)                                     # score >= the shipped threshold

Training is one Ray Train `TorchTrainer` (one worker per GPU where there are GPUs, else one CPU
worker using all its cores): a sequence classifier with two labels on top of the encoder, AdamW
with linear decay. Then the driver scores the held-out rows with the model exactly as it will serve
(`guard.inference`: int8 dynamic quantisation of the Linear layers by default, the fast CPU path)
and chooses the threshold on those scores for `guard.target_fpr`. guard.json keeps the threshold, the
validation metrics and where the data came from, beside the saved model; the folder is then registered
in MLflow (registry.store.register_guard).
"""

from __future__ import annotations

import json
import time
from typing import Any

from raytune_app import console, models, storage
from raytune_app.config import Recipe
from raytune_app.errors import MissingInput


def _worker(config: dict) -> None:
    """Ray Train worker loop: fine-tune, then write the model (rank 0). With config["in_process"] the same
    loop runs in the calling process on its CPU, without Ray (train_guard(in_process=True))."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from raytune_app.guard.deobfuscate import guard_view

    torch.manual_seed(config["seed"])
    tokenizer = AutoTokenizer.from_pretrained(config["base"])
    # guard.encoder_layers N: transformers builds the shallower encoder and loads the first layers' weights only;
    # a list of indices: the whole base is loaded, then the listed layers kept.
    layers = config.get("encoder_layers")
    depth = {"num_hidden_layers": layers} if isinstance(layers, int) else {}
    model = AutoModelForSequenceClassification.from_pretrained(config["base"], num_labels=2, **depth)
    if isinstance(layers, list):
        _keep_layers(model, layers)
    # Decoder bases (Llama-style) often ship no pad token: pad with end-of-sequence (train_guard checked there is
    # one). Their classifier reads each row's last token that is not the pad, so padding is never read; the
    # saved tokenizer and config carry the choice to scoring and serving.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.get("in_process"):
        device, rank, report = torch.device("cpu"), 0, lambda metrics: None
    else:
        import ray.train
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
        device, rank, report = ray.train.torch.get_device(), ray.train.get_context().get_world_rank(), ray.train.report
    train_rows = config["train"]

    for row in train_rows:
        row["view"] = guard_view(row["text"])
        row["tokens"] = len(tokenizer(row["view"], truncation=True, max_length=config["max_length"])["input_ids"])
    if config.get("teacher"):
        _teacher_logits(config["teacher"], train_rows, config["max_length"])

    def batches(rows, shuffle: bool, seed: int):
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(rows), generator=generator).tolist() if shuffle else list(range(len(rows)))
        # Length buckets: within each stretch of 16 batches the rows are sorted by length, so a batch pads to
        # about its own rows' length (short public prompts no longer pad to a long jailbreak); the batches
        # are then shuffled. On CPU this halves a step's cost on a mix of one-liners and long prompts.
        size = config["batch_size"]
        stretch = 16 * size
        chunks = []
        for i in range(0, len(order), stretch):
            part = sorted(order[i : i + stretch], key=lambda j: rows[j]["tokens"])
            chunks += [part[k : k + size] for k in range(0, len(part), size)]
        for c in torch.randperm(len(chunks), generator=generator).tolist() if shuffle else range(len(chunks)):
            chunk = [rows[j] for j in chunks[c]]
            encoded = tokenizer(
                [r["view"] for r in chunk],  # the text serving will score (guard/deobfuscate.py)
                truncation=True,
                max_length=config["max_length"],
                padding=True,
                return_tensors="pt",
            )
            teacher = torch.tensor([r["teacher"] for r in chunk], device=device) if config.get("teacher") else None
            yield encoded.to(device), torch.tensor([r["label"] for r in chunk], device=device), teacher

    steps = config["epochs"] * -(-len(train_rows) // config["batch_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"])
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    step, began = 0, time.time()
    model.train()
    for epoch in range(config["epochs"]):
        for encoded, labels, teacher in batches(train_rows, True, config["seed"] + epoch):
            logits = model(**encoded).logits
            loss = torch.nn.functional.cross_entropy(logits, labels)
            if teacher is not None:
                loss = (1 - config["distill_weight"]) * loss + config["distill_weight"] * _distill_loss(
                    logits, teacher, config["distill_temperature"]
                )
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0 or step == steps:
                console.logger("guard").info(
                    f"step {step}/{steps}  loss {loss.item():.4f}  "
                    f"ETA {(time.time() - began) / step * (steps - step) / 60:.1f} min"
                )
    # The validation rows are scored by the driver afterwards, with the precision that ships (guard.inference).
    if rank == 0:
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.save_pretrained(config["model_dir"])
        tokenizer.save_pretrained(config["model_dir"])
    report({"steps": step, "last_loss": loss.item()})


def _keep_layers(model, indices: list[int]) -> None:
    """Keep only the transformer layers at `indices` (ascending) of a loaded model: its stack of layers is the
    module list as long as config.num_hidden_layers (BERT's encoder.layer, Llama's model.layers)."""
    import torch

    depth = model.config.num_hidden_layers
    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth and n)
    parent, _, attribute = name.rpartition(".")
    stack = model.get_submodule(name)
    setattr(model.get_submodule(parent), attribute, torch.nn.ModuleList([stack[i] for i in indices]))
    model.config.num_hidden_layers = len(indices)


def _teacher_logits(teacher_dir: str, rows: list[dict], max_length: int) -> None:
    """guard.teacher: the teacher guard's two logits on each training row, stored as row["teacher"]. Read once
    before training, as the teacher scores (its own text view, float32), in length order so batches pad little."""
    info = json.loads(storage.read_text(f"{teacher_dir}/guard.json"))
    tokenizer, teacher = load_classifier(f"{teacher_dir}/model", "float32")
    order = sorted(range(len(rows)), key=lambda i: rows[i]["tokens"])
    began = time.time()
    texts = [rows[i]["text"] for i in order]
    for i, logits in zip(order, score_texts(tokenizer, teacher, texts, max_length, 64, view_of(info), class_logits)):
        rows[i]["teacher"] = logits
    console.logger("guard").info(f"teacher {teacher_dir}: {len(rows)} rows read in {time.time() - began:.0f} s")


def _distill_loss(logits, teacher_logits, temperature: float):
    """Kullback-Leibler divergence from the teacher's to the student's class distribution, both softened by
    `temperature`; scaled by its square so the gradient keeps the size of the label loss's (Hinton et al.)."""
    import torch.nn.functional as F

    return (
        F.kl_div(
            F.log_softmax(logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


def _fit_on_ray(loop_config: dict, out_dir: str) -> None:
    """The training loop on one Ray Train worker: a GPU where the cluster has one, else all its CPUs."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    trainer = TorchTrainer(
        _worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=1,
            use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": max(1, int(ray.cluster_resources().get("CPU", 1)))},
        ),
        run_config=RunConfig(name="guard", storage_path=f"{out_dir}/ray"),
    )
    trainer.fit()


def _rows_for(recipe: Recipe) -> tuple[list[dict], list[dict], list[dict]]:
    """(all rows, train, validation) of the recipe's guard data; every data problem surfaces here."""
    from raytune_app.guard import data

    rows = data.training_rows(recipe)
    train_rows, val_rows = data.split_for_training(rows, recipe)  # disguised copies on the training side only
    if not any(r["label"] == 0 for r in val_rows):
        raise data.GuardDataError("no benign rows landed in validation; add benign rows or raise guard.val_fraction")
    return rows, train_rows, val_rows


def _guard_dir(recipe: Recipe) -> str:
    from raytune_app.guard import data

    out_dir = storage.absolute(recipe.stage_dir("guard"))
    if "://" in out_dir:
        raise data.GuardDataError("guard training writes its model locally; set run.output_dir to a local path")
    return out_dir


def train_guard(recipe: Recipe, in_process: bool = False) -> dict:
    """Train the guard of this recipe and choose its thresholds; returns guard.json's content.

    `in_process`: run the training loop in this process on its CPU instead of on a Ray Train worker (the
    same loop and data); for a machine so loaded that a local Ray does not come up in time."""
    cfg = recipe.guard
    base = models.resolve(cfg.base)
    _check_teacher(cfg.teacher)  # first: a student's base is often inside its teacher's folder
    _check_base(base, cfg.encoder_layers)
    rows, train_rows, val_rows = _rows_for(recipe)
    out_dir = _guard_dir(recipe)
    model_dir = f"{out_dir}/model"
    console.logger("guard").info(f"{len(train_rows)} train / {len(val_rows)} validation rows; base {cfg.base}")
    loop_config = {
        "base": base,
        "encoder_layers": cfg.encoder_layers,
        "teacher": storage.absolute(cfg.teacher) if cfg.teacher else None,
        "distill_weight": cfg.distill_weight,
        "distill_temperature": cfg.distill_temperature,
        "train": train_rows,
        "seed": recipe.run.seed,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "max_length": cfg.max_length,
        "model_dir": model_dir,
    }
    if in_process:
        _worker(loop_config | {"in_process": True})
    else:
        _fit_on_ray(loop_config, out_dir)
    return _choose_thresholds(recipe, out_dir, rows, train_rows, val_rows)


def _check_base(base: str, layers: int | list[int] | None) -> None:
    """Before any data or model work, refuse a guard.encoder_layers deeper than the base (transformers would add
    random layers) and a base whose tokenizer has neither a pad nor an end-of-sequence token to pad batches with."""
    from transformers import AutoConfig, AutoTokenizer

    from raytune_app.errors import RecipeError

    try:
        available = AutoConfig.from_pretrained(base).num_hidden_layers
    except OSError as error:  # no such folder here, and not a model the hub (or its cache) has
        reason = str(error).splitlines()[0]
        raise RecipeError(
            "guard", [f"guard.base: {base} is not a model folder here, nor one transformers can load ({reason})"]
        ) from None
    problems = []
    if isinstance(layers, int) and layers > available:
        problems.append(
            f"guard.encoder_layers: {layers}, but the base encoder has {available} layers; use 1-{available}"
        )
    if isinstance(layers, list) and (not layers or layers != sorted(set(layers)) or layers[-1] >= available):
        problems.append(
            f"guard.encoder_layers: {layers}; list layer indices in ascending order, each once, from 0 to "
            f"{available - 1} (the base encoder has {available} layers)"
        )
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        problems.append(
            f"guard.base: {base}'s tokenizer has no pad token and no end-of-sequence token to pad batches with; "
            "save the tokenizer with a pad_token set, or choose another base"
        )
    if problems:
        raise RecipeError("guard", problems)


def _check_teacher(teacher: str | None) -> None:
    """Before any data work, refuse a guard.teacher that is not a trained guard folder."""
    from raytune_app.errors import RecipeError

    if teacher and "://" in teacher:
        raise RecipeError("guard", [f"guard.teacher: {teacher} is not a local folder; copy the guard folder here"])
    if teacher and not storage.exists(storage.join(storage.absolute(teacher), "guard.json")):
        problem = f"guard.teacher: {teacher} holds no trained guard (no guard.json); train it first or fix the path"
        raise RecipeError("guard", [problem])


def calibrate_guard(recipe: Recipe) -> dict:
    """Choose the thresholds of the recipe's trained guard again, without training: for the recipe's
    `guard.target_fpr`, `threshold_source_weights` and `inference` paths as they are now (e.g. a guard trained
    on a CPU without native bf16, calibrated for bf16 on one that has it). The validation rows are the same
    hash split training used. Rewrites guard.json and registers the folder as a new version; returns guard.json."""
    rows, train_rows, val_rows = _rows_for(recipe)
    out_dir = _guard_dir(recipe)
    if not storage.exists(storage.join(out_dir, "model")):
        raise MissingInput(f"no trained guard model at {out_dir}/model; run `raytune-app guard train` first")
    return _choose_thresholds(recipe, out_dir, rows, train_rows, val_rows)


def _choose_thresholds(
    recipe: Recipe, out_dir: str, rows: list[dict], train_rows: list[dict], val_rows: list[dict]
) -> dict:
    """Score the validation rows with each inference path, choose each path's threshold, write guard.json and
    register the guard; returns guard.json's content."""
    from raytune_app.guard.metrics import detection_metrics, source_weights, threshold_for_fpr

    cfg = recipe.guard
    model_dir = f"{out_dir}/model"
    # Thresholds on the scores of the model exactly as eval / score / serving will run it, one per inference
    # path (guard.inference; `auto`: int8, and bf16 where this CPU has it natively).
    labels = [r["label"] for r in val_rows]
    # Chosen on validation rows only; guard.threshold_source_weights sets how much each source's benign rows
    # count towards the false-alarm budget (empty: each row once).
    weights = source_weights([r["source"] for r in val_rows], labels, cfg.threshold_source_weights)
    scores_by_path, thresholds = {}, {}
    for path in inference_paths(cfg.inference):
        tokenizer, model = load_classifier(model_dir, path)
        # One prompt at a time, as `guard eval` and `guard score` run: int8 activations are quantised with one
        # scale per tensor, so padding a prompt into a batch moves its score slightly.
        scores_by_path[path] = score_texts(tokenizer, model, [r["text"] for r in val_rows], cfg.max_length, 1)
        thresholds[path] = threshold_for_fpr(scores_by_path[path], labels, cfg.target_fpr, weights)
    # guard.json's `inference`, `threshold` and `validation` are those of the path this machine would score with.
    inference = preferred_path(thresholds)
    scores, threshold = scores_by_path[inference], thresholds[inference]
    summary: dict[str, Any] = {
        "base": cfg.base,
        **({"teacher": cfg.teacher, "distill_weight": cfg.distill_weight} if cfg.teacher else {}),
        "threshold": threshold,
        "target_fpr": cfg.target_fpr,
        "max_length": cfg.max_length,
        "inference": inference,
        "thresholds": thresholds,
        "text_view": TEXT_VIEW,
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "sources": sorted({r["source"] for r in rows}),
        "validation": detection_metrics(scores, labels, threshold, [r["attack_type"] for r in val_rows]),
        "validation_by_inference": {
            path: {k: v for k, v in detection_metrics(scores_by_path[path], labels, t).items() if k in _HEADLINE}
            for path, t in thresholds.items()
        },
        "threshold_source_weights": cfg.threshold_source_weights,
        "validation_fpr_by_source": _fpr_by_source(scores, val_rows, threshold),
        "validation_weighted_fpr": None
        if weights is None
        else round(sum(w for w, s in zip(weights, scores) if s >= threshold) / sum(weights), 6),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_text(f"{out_dir}/guard.json", json.dumps(summary, indent=2) + "\n")
    from raytune_app.registry.store import register_guard

    version = register_guard(recipe, out_dir, summary)
    console.logger("guard").info(
        f"registered models:/{version['name']}/{version['version']} (champion: version {version['champion']}) "
        f"in {version['tracking_uri']}"
    )
    console.logger("guard").info(
        f"threshold {threshold:.4f} ({inference}; {', '.join(f'{p} {t:.4f}' for p, t in thresholds.items())}) "
        f"for FPR <= {cfg.target_fpr}; validation: AUC "
        f"{summary['validation']['auc']}, TPR {summary['validation']['tpr']}, FPR {summary['validation']['fpr']}; "
        f"saved to {out_dir}"
    )
    return summary


def _fpr_by_source(scores: list[float], rows: list[dict], threshold: float) -> dict:
    """False alarms at the threshold on each source's benign validation rows: {source: {n, fpr}}."""
    alarms: dict[str, list[bool]] = {}
    for score, row in zip(scores, rows):
        if row["label"] == 0:
            alarms.setdefault(row["source"], []).append(score >= threshold)
    return {s: {"n": len(v), "fpr": round(sum(v) / len(v), 6)} for s, v in sorted(alarms.items())}


class Guard:
    """A trained guard: attack probabilities for texts, and the block decision at its threshold.

    The precision it scores with (`precision`, else chosen by `preferred_path` from the thresholds guard.json
    holds): "bf16" (weights in bfloat16: the fastest path on CPUs that compute bf16 natively, AMX / AVX-512
    BF16), "int8" (torch's dynamic quantisation of every Linear layer: weights in int8, activations quantised
    per call; the fast path on other CPUs) or "float32" (the model as trained). Each path's threshold is chosen
    on that path's own validation scores at training (guard.json `thresholds`); asking for a path the guard has
    no threshold for scores with guard.json's main `threshold`, for comparisons only.

    `compile`: bf16 only, on CPU: the model goes through torch.compile (inductor, weights frozen into the
    graph) and is warmed up here for batches of one and of several, ~20 s each on two cores; a batch-1
    128-token window then scores ~12% faster than eager bf16 and ~27% faster than int8 (BENCHMARKS.md).
    Serving turns it on (serve.guard.compile); where it cannot compile (no C++ compiler) the eager model
    scores, with a warning.
    """

    def __init__(self, folder: str, threads: int | None = None, precision: str | None = None, compile: bool = False):
        import torch

        if threads:
            torch.set_num_threads(threads)
        info = json.loads(storage.read_text(storage.join(folder, "guard.json")))
        self.info = info
        # Guards trained before `thresholds` existed have one, chosen on the path `inference` names (float32
        # for those trained before that was recorded).
        thresholds = info.get("thresholds") or {info.get("inference", "float32"): info["threshold"]}
        self.precision = precision or preferred_path(thresholds)
        self.threshold = thresholds.get(self.precision, info["threshold"])
        self.tokenizer, self.model = load_classifier(f"{folder}/model", self.precision)
        self.max_length = info["max_length"]
        # The text the model was trained to read: guards trained before guard/deobfuscate.py existed read
        # `normalize` only, and keep scoring that way (their threshold was chosen on it).
        self.view = view_of(info)
        self.compiled = compile and self.precision == "bf16" and _compiled(self)

    @classmethod
    def load(
        cls, folder: str, threads: int | None = None, precision: str | None = None, compile: bool = False
    ) -> Guard:
        if not storage.exists(storage.join(folder, "guard.json")):
            raise MissingInput(
                f"no trained guard at {folder} (guard.json missing); run `raytune-app guard train` first"
            )
        return cls(folder, threads, precision, compile)

    def scores(self, texts: list[str]) -> list[float]:
        return score_texts(
            self.tokenizer, self.model, texts, self.max_length, batch_size=max(1, len(texts)), view=self.view
        )

    def blocks(self, texts: list[str]) -> list[bool]:
        return [s >= self.threshold for s in self.scores(texts)]

    def windows(self, segments: list[str], overlap: float = 0.5) -> tuple[list[list[int]], list[int]]:
        """Every window the guard reads of `segments` (see `window_ids`): (input ids, segment index of each)."""
        return window_ids(self.tokenizer, segments, self.max_length, overlap, view=self.view)

    def score_windows(
        self, windows: list[list[int]], batch_size: int = 32, cache: WindowCache | None = None, on_batch=None
    ) -> list[float]:
        """Scores of windows of input ids; with a cache, each distinct window not seen before is scored once
        (in batches of `batch_size`; `on_batch()` after each) and the rest are looked up."""
        if cache is None:
            return score_ids(self.tokenizer, self.model, windows, batch_size)
        keys = [tuple(w) for w in windows]
        known: dict[tuple, float | None] = {k: cache.get(k) for k in dict.fromkeys(keys)}
        todo = [k for k, v in known.items() if v is None]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            for key, score in zip(chunk, score_ids(self.tokenizer, self.model, [list(k) for k in chunk], batch_size)):
                known[key] = score
                cache.put(key, score)
            if on_batch is not None:
                on_batch()
        return [score for score in (known[k] for k in keys) if score is not None]

    def score_segments(self, segments: list[str], overlap: float = 0.5, cache: WindowCache | None = None) -> dict:
        """The worst window over `segments` (a long prompt read whole): {score, segment, windows}."""
        ids, owners = self.windows(segments, overlap)
        scores = self.score_windows(ids, cache=cache)
        worst = max(range(len(scores)), key=scores.__getitem__)
        return {"score": scores[worst], "segment": owners[worst], "windows": len(ids)}


class WindowCache:
    """Scores of windows already read, least recently used dropped beyond `size`. A conversation resends
    its whole history, and an app its system prompt, with every request: each message's windows depend on
    that message alone, so all but the newest message are found here and only new text costs a forward
    pass. Keyed by the exact input ids; a score is the model's for that window (int8 activations are
    quantised per batch, so it may differ from a fresh score in the last decimals)."""

    def __init__(self, size: int = 4096):
        from collections import OrderedDict

        self.items: OrderedDict[tuple, float] = OrderedDict()
        self.size, self.hits, self.misses = size, 0, 0

    def get(self, key: tuple) -> float | None:
        score = self.items.get(key)
        if score is None:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return score

    def put(self, key: tuple, score: float) -> None:
        self.items[key] = score
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


PRECISIONS = ("int8", "bf16", "float32")
_HEADLINE = ("threshold", "auc", "tpr", "fpr", "tpr_at_fpr_1pct")  # guard.json's per-path validation summary


def inference_paths(setting: str) -> list[str]:
    """The precisions a guard gets a threshold for at training, from `guard.inference`: `auto` is int8 (fast on
    every CPU) and, where this CPU computes bf16 natively, bf16 too (faster there); any other value is itself."""
    if setting != "auto":
        return [setting]
    return ["int8", "bf16"] if models.cpu_has_bf16() else ["int8"]


def preferred_path(thresholds: dict[str, float]) -> str:
    """The precision to score with on this machine, among those a guard has thresholds for: bf16 where the CPU
    computes it natively, else int8, else the one there is."""
    if "bf16" in thresholds and models.cpu_has_bf16():
        return "bf16"
    return "int8" if "int8" in thresholds else next(iter(thresholds))


def load_classifier(model_dir: str, precision: str):
    """(tokenizer, model in eval mode) of a saved guard model in `precision` (int8: quantised Linear layers)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if precision not in PRECISIONS:
        raise ValueError(f"guard precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).eval()
    return tokenizer, quantize_int8(model) if precision == "int8" else model


def _compiled(guard: Guard) -> bool:
    """Swap the guard's model for its torch.compile'd form (inductor, weights frozen) and warm it up for a
    batch of one and a batch of several (the two graphs dynamic shapes specialise); False, with the eager model
    kept, where compiling fails."""
    import torch

    eager = guard.model
    try:
        guard.model = torch.compile(eager, dynamic=True, options={"freezing": True})
        # Warmed up through the two ways the guard scores (texts, and windows of ids), each for a batch of one
        # and of several: after this no call compiles again (a serving replica's first requests waited 10 s on a
        # graph compiled for the windows' inputs before both ways passed the same ones). The first call's
        # shapes are the compiler's size hints: a full window first, the size the latency aim is set at
        # (measured: model p50 10.3-11.1 ms vs 11.0-11.2 ms warmed up on a 4-token prompt).
        full = " ".join(["warm up"] * guard.max_length)
        for texts in ([full], [full, "a batch of two"]):
            guard.scores(texts)
            guard.score_windows(guard.windows(texts)[0])
    except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager model, which scores the same
        guard.model = eager
        console.logger("guard").warning(
            f"torch.compile of the guard failed ({type(exc).__name__}: {str(exc)[:200]}); scoring with the eager "
            "bf16 model (same scores, ~30% slower)"
        )
        return False
    return True


TEXT_VIEW = "deobfuscate"  # guard.json's `text_view` for guards that read guard/deobfuscate.py's guard_view


def view_of(info: dict):
    """The function a guard reads its text through, from its guard.json."""
    from raytune_app.guard.deobfuscate import guard_view
    from raytune_app.guard.normalize import normalize

    return guard_view if info.get("text_view") == TEXT_VIEW else normalize


def score_texts(
    tokenizer, model, texts: list[str], max_length: int, batch_size: int = 32, view=None, read=None
) -> list:
    """Attack probabilities of `texts` read through `view` (default guard/deobfuscate.py's guard_view), cut at
    `max_length` tokens, in batches (padding only to the longest prompt of a batch); `read=class_logits`: each
    text's two logits instead."""
    import torch

    from raytune_app.guard.deobfuscate import guard_view

    view = view or guard_view
    out: list = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            encoded = tokenizer(
                [view(t) for t in texts[i : i + batch_size]],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            out += (read or attack_probabilities)(model, encoded)
    return out


def attack_probabilities(model, encoded) -> list[float]:
    """P(attack) for a tokenised batch."""
    import torch

    return torch.softmax(_logits(model, encoded), dim=-1)[:, 1].tolist()


def class_logits(model, encoded) -> list[list[float]]:
    """The (benign, attack) logits of each row of a tokenised batch."""
    return _logits(model, encoded).tolist()


def _logits(model, encoded):
    """Only input ids and attention mask go in, from texts and from windows alike (token type ids would be all
    zeros, the model's default): a compiled guard then sees one signature."""
    return model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.float()


def window_ids(
    tokenizer, texts: list[str], max_length: int, overlap: float = 0.5, view=None
) -> tuple[list[list[int]], list[int]]:
    """Each text read through `view` (default guard_view) cut into overlapping windows of `max_length` tokens,
    special tokens included: the tokenizer's own overflow windows, each repeating the last `overlap` share of
    the one before, so any stretch of up to that many tokens + 1 lies whole inside one window whatever
    precedes it. A text that fits is one window holding exactly what truncation gives, so it scores as it
    always did. Returns the windows' input ids and, for each, the index of its text."""
    from raytune_app.guard.deobfuscate import guard_view

    view = view or guard_view
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    stride = min(room - 1, max(0, int(room * overlap)))
    encoded = tokenizer(
        [view(t) for t in texts],
        truncation=True,
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
    )
    return encoded["input_ids"], list(encoded["overflow_to_sample_mapping"])


def score_ids(tokenizer, model, windows: list[list[int]], batch_size: int = 32) -> list[float]:
    """Attack probabilities of windows of input ids (special tokens included, as `window_ids` gives them),
    in batches padded to their longest window."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            encoded = tokenizer.pad({"input_ids": windows[i : i + batch_size]}, padding=True, return_tensors="pt")
            out += attack_probabilities(model, encoded)
    return out


def quantize_int8(model):
    """The model with its Linear layers dynamically quantised to int8 (CPU inference only)."""
    import torch

    engines = torch.backends.quantized.supported_engines
    # x86 / fbgemm are the fast kernels on Intel and AMD; qnnpack is the ARM one.
    for engine in ("x86", "fbgemm", "qnnpack"):
        if engine in engines:
            torch.backends.quantized.engine = engine
            break
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch 2.x flags torch.ao.quantization as moving to torchao; it still works
        warnings.simplefilter("ignore")
        # One weight scale per output channel, not per matrix: on the trained MiniLM guard it cut the largest
        # score change against float32 from 0.79 to 0.31 (mean 0.018 -> 0.006) at the same speed.
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def evaluate_guard(guard: Guard, rows: list[dict]) -> dict:
    """The guard's detection metrics on labelled rows, with CPU latency per prompt at batch 1."""
    import numpy as np

    from raytune_app.guard.metrics import detection_metrics

    guard.scores([rows[0]["text"]])  # warm-up: the first call allocates
    scores, latencies = [], []
    for row in rows:
        began = time.perf_counter()
        scores += guard.scores([row["text"]])
        latencies.append((time.perf_counter() - began) * 1000)
    types = [r["attack_type"] for r in rows]
    result = detection_metrics(scores, [r["label"] for r in rows], guard.threshold, types if any(types) else None)
    p50, p99 = (float(np.percentile(np.asarray(latencies, dtype=float), q)) for q in (50, 99))
    return result | {
        "latency_ms_p50": round(float(p50), 3),
        "latency_ms_p99": round(float(p99), 3),
        "precision": guard.precision,
    }
