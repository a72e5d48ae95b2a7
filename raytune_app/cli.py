"""The `raytune-app` command line.

    raytune-app validate recipes/quickstart.yaml [key.sub=value ...] [--explain] [--gpus N | --cluster cluster/aws.yaml]
    raytune-app prepare  --recipe recipes/quickstart.yaml [key.sub=value ...] [--force]
    raytune-app tune     --recipe recipes/tune_quickstart.yaml [--resume | --restart]
    raytune-app evaluate --recipe recipes/quickstart.yaml [--data FILE.jsonl] [--adapter PATH | models:/NAME@ALIAS]
    raytune-app registry list|show|promote|rollback [--recipe R | --tracking-uri URI]
    raytune-app export   --recipe R --format merged|gguf --out DIR [--adapter PATH | models:/NAME@ALIAS]
    raytune-app run      --recipe recipes/quickstart.yaml      (or: raytune-app run recipes/quickstart.yaml)
    raytune-app <stage> --help

Every command validates the whole recipe first and exits 2 with the list of problems before any Ray
work. Ray is started here (and only here, only if not already running): inside `ray job submit` or
with RAY_ADDRESS set it joins that cluster, otherwise it starts a local one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback

from raytune_app import cluster, config, console
from raytune_app.errors import EXIT_BAD_RECIPE, EXIT_BUG, user_error

# What an unexpected error (a bug, not a mistake in the recipe or data) adds below its traceback.
BUG_HINT = (
    "raytune-app stopped on an unexpected error (the traceback above): this is likely a bug in raytune_app, "
    "not in your recipe or data. Please report it with the traceback, the command and the resolved recipe "
    "(<run dir>/recipe.yaml)."
)


def ensure_ray(recipe: config.Recipe | None = None, command: str | None = None) -> None:
    # One helper for the CLI and the Ray job entrypoints (jobs/*.py): raytune_app/cluster.py.
    cluster.connect(recipe, command)


def _add_console_args(parser: argparse.ArgumentParser) -> None:
    # Accepted before and after the command (`raytune-app -q run ...`, `raytune-app run ... -q`): SUPPRESS
    # keeps a subcommand's parser from resetting what the top level set (its default: set_defaults).
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        dest="verbosity",
        const=console.QUIET,
        default=argparse.SUPPRESS,
        help="only warnings, errors and the result on the console",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        dest="verbosity",
        const=console.VERBOSE,
        default=argparse.SUPPRESS,
        help="also Ray's and the libraries' output on the console (it always goes to <run dir>/raytune-app.log)",
    )


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    _add_console_args(parser)
    parser.add_argument("recipe_file", nargs="?", metavar="RECIPE", help="recipe YAML (or use --recipe)")
    parser.add_argument("--recipe", dest="recipe_opt", metavar="FILE", help="recipe YAML")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="override recipe fields, e.g. train.lora.rank=8"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raytune-app", description="Fine-tune language models on Ray and serve them safely."
    )
    _add_console_args(parser)
    parser.set_defaults(verbosity=console.NORMAL)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser(
        "validate",
        help="check a recipe and exit non-zero with every problem found",
        description="Check a recipe (types, ranges, unknown keys, incompatible choices) without running anything.",
    )
    _add_recipe_args(validate)
    validate.add_argument(
        "--explain", action="store_true", help="print every recipe field with its default and meaning"
    )
    validate.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="also check that every stage fits a cluster of N GPUs (exit 2 listing what will not fit)",
    )
    validate.add_argument(
        "--cpus", type=int, metavar="N", help="with --gpus / --cluster: the cluster's CPUs, checked too"
    )
    validate.add_argument(
        "--cluster",
        metavar="FILE",
        help="take N GPUs (and CPUs) from a cluster file: cluster/aws.yaml, cluster/gcp.yaml or a KubeRay "
        "manifest, every worker group at its maximum",
    )

    stage_help = {
        "prepare": "read, validate, dedupe, split, template, tokenise and pack the data (Ray Data)",
        "distill": "teacher rationales and labels for Distilling Step-by-Step (Ray Data)",
        "train": "SFT / DPO / GRPO with LoRA, QLoRA, DeepSpeed (Ray Train)",
        "tune": "hyper-parameter search over training runs (Ray Tune)",
        "evaluate": "batch generation and task metrics, base vs tuned (Ray Data)",
        "register": "log the trained weights to MLflow as a model version with lineage; move aliases",
        "serve": "OpenAI-compatible endpoint with a guard in front (Ray Serve)",
    }
    for stage, text in stage_help.items():
        p = sub.add_parser(stage, help=text, description=text[0].upper() + text[1:] + ".")
        _add_recipe_args(p)
        if stage in ("prepare", "distill"):
            p.add_argument("--force", action="store_true", help="recompute even when inputs and settings are unchanged")
        if stage == "train":
            group = p.add_mutually_exclusive_group()
            group.add_argument(
                "--resume",
                action="store_true",
                help="continue the interrupted run from its latest checkpoint (fails if there is none)",
            )
            group.add_argument(
                "--restart", action="store_true", help="move any earlier run aside and start from step 0"
            )
        if stage == "tune":
            group = p.add_mutually_exclusive_group()
            group.add_argument(
                "--resume",
                action="store_true",
                help="continue the interrupted search (fails if there is none); an interrupted search "
                "with the same recipe and data also continues without it",
            )
            group.add_argument("--restart", action="store_true", help="move any earlier search aside and start again")

        if stage == "serve":
            p.add_argument(
                "--no-block",
                action="store_true",
                help="return once the app is up (it keeps running on the Ray cluster) instead of waiting for Ctrl-C",
            )
        if stage == "evaluate":
            p.add_argument(
                "--data",
                metavar="FILE.jsonl",
                help="score a JSONL file (read with the recipe's data.columns) instead of the prepared split; "
                "the metrics JSON goes to stdout",
            )
            p.add_argument(
                "--adapter",
                metavar="PATH|models:/NAME@ALIAS",
                help="evaluate these weights (a folder or a registry URI) instead of the train stage's",
            )
            p.add_argument(
                "--force", action="store_true", help="recompute even when models, data and settings are unchanged"
            )

    pairs = sub.add_parser(
        "pairs",
        help="preference pairs (for DPO) from the trained model's failing answers",
        description="Let the trained model answer a prepared split; every failing answer becomes a "
        "preference pair (chosen: the reference, rejected: the answer), written as JSONL for a DPO recipe.",
    )
    _add_recipe_args(pairs)
    pairs.add_argument(
        "--adapter", metavar="PATH|models:/NAME@ALIAS", help="these weights instead of the train stage's"
    )
    pairs.add_argument(
        "--split", choices=["train", "val"], default="train", help="prepared split whose prompts are answered"
    )
    pairs.add_argument("--samples", type=int, default=1, help="answers sampled per prompt (1: greedy)")
    pairs.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    pairs.add_argument("--out", metavar="DIR", help="output folder (default: <run dir>/pairs)")

    export = sub.add_parser(
        "export",
        help="merge a trained adapter into standalone weights (safetensors) or write it as GGUF",
        description="Merge a trained LoRA / QLoRA adapter into its base and write standalone weights (merged "
        "safetensors + tokenizer + generation config) or one GGUF file for llama.cpp / Ollama, with lineage.json.",
    )
    _add_recipe_args(export)
    export.add_argument(
        "--adapter", metavar="PATH|models:/NAME@ALIAS", help="these weights instead of the train stage's adapter"
    )
    export.add_argument("--format", dest="export_format", choices=["merged", "gguf"], default="merged")
    export.add_argument("--out", required=True, metavar="DIR", help="output folder (refused if not empty, see --force)")
    export.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the merged weights (default bf16)"
    )
    export.add_argument(
        "--quantization",
        choices=["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"],
        default="q8_0",
        help="GGUF tensor type for matrices (--format gguf; default q8_0)",
    )
    export.add_argument(
        "--register", action="store_true", help="also register the export in MLflow as a version of <name>-merged"
    )
    export.add_argument("--force", action="store_true", help="replace a non-empty --out folder")

    registry = sub.add_parser(
        "registry",
        help="list, show, promote and roll back registered model versions (MLflow)",
        description="Work on the MLflow model registry of a recipe's run (or any tracking URI).",
    )
    actions = registry.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in {
        "list": "registered models with their aliases",
        "show": "one version: source, lineage tags, evaluation metrics",
        "promote": "point an alias (default champion) at a version",
        "rollback": "point an alias back at the version it held before its last move",
    }.items():
        a = actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        where = a.add_mutually_exclusive_group()
        where.add_argument("--recipe", dest="recipe_opt", metavar="FILE", help="use this recipe's registry settings")
        where.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
        if action != "list":
            a.add_argument("name", help="registered model name")
        if action == "show":
            a.add_argument("ref", nargs="?", help="version number or @alias (default: the latest version)")
        if action == "promote":
            a.add_argument("ref", help="version number or @alias (e.g. @challenger)")
        if action in ("promote", "rollback"):
            a.add_argument("--alias", default="champion", help="the alias to move (default: champion)")

    guard = sub.add_parser(
        "guard",
        help="train, evaluate and try the prompt-injection guard classifier",
        description="The guard: a small encoder that scores prompts for injection / jailbreak attempts.",
    )
    guard_actions = guard.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in {
        "train": "fine-tune the guard (Ray Train) and choose its threshold on validation",
        "eval": "detection metrics of a guard on a labelled JSONL / Parquet file (JSON on stdout)",
        "score": "attack probability of one text",
        "calibrate": "choose a trained guard's thresholds again (the recipe's target_fpr and inference paths), "
        "without training",
    }.items():
        g = guard_actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        g.add_argument(
            "--recipe",
            dest="recipe_opt",
            metavar="FILE",
            help=f"recipe with a `guard` section (default: {DEFAULT_GUARD_RECIPE})",
        )
        if action == "train":
            g.add_argument(
                "--in-process",
                action="store_true",
                help="train in this process on its CPU, without Ray (same loop and data; for a machine too loaded "
                "for a local Ray to come up)",
            )
        if action in ("eval", "score"):
            g.add_argument(
                "--model",
                metavar="DIR",
                help="a trained guard folder (default: the recipe's; trained first if missing)",
            )
            g.add_argument(
                "--precision",
                choices=["int8", "bf16", "float32"],
                help="score with this precision instead of the one the guard picks for this machine (the guard's "
                "threshold for it where guard.json has one, else its main threshold: for comparisons)",
            )
        if action == "eval":
            g.add_argument("--data", required=True, metavar="FILE", help="labelled JSONL or Parquet file")
            g.add_argument("--text-field", default="text", help="column with the prompt (default: text)")
            g.add_argument("--label-field", default="label", help="column with the 0/1 label (default: label)")
        if action == "score":
            g.add_argument("text", help="the prompt to score")

    run = sub.add_parser(
        "run",
        help="run the recipe's stages in order (run.stages), skipping unchanged ones",
        description="Run the recipe's stages in order (run.stages); a stage whose inputs are unchanged is reused.",
    )
    _add_recipe_args(run)
    return parser


def _recipe_path(args) -> str:
    path = args.recipe_opt or args.recipe_file
    if args.recipe_opt and args.recipe_file:
        # `--recipe X key=value`: argparse puts the first override into recipe_file.
        args.overrides.insert(0, args.recipe_file)
    if not path:
        raise config.RecipeError("command line", ["no recipe given: pass RECIPE or --recipe FILE"])
    return path


def _prepare(recipe: config.Recipe, force: bool = False) -> dict:
    from raytune_app.data.prepare import prepare

    manifest = prepare(recipe, force=force)
    out = {split: manifest["rows_out"][split] for split in ("train", "val", "test")}
    rejected = ", ".join(f"{k} {v}" for k, v in manifest["rejected"].items()) or "none"
    log = console.logger("prepare")
    log.info(
        f"{manifest['rows_in']} rows in -> train {out['train']}, val {out['val']}, test {out['test']}; "
        f"rejected: {rejected}"
    )
    log.info(f"output: {recipe.stage_dir('prepare')} (manifest.json, rejected.jsonl)")
    return manifest


def _distill(recipe: config.Recipe, force: bool = False) -> dict:
    from raytune_app.distill.run import distill

    return distill(recipe, force=force)


def _start(recipe: config.Recipe) -> None:
    from raytune_app import storage

    saved = config.save_resolved(recipe, recipe.run_dir)
    log_file = console.attach_log_file(storage.absolute(recipe.run_dir))
    console.logger().info(
        f"run `{recipe.run.name}`: model {recipe.model.path}; resolved recipe {saved}; full log {log_file}"
    )


def _train(recipe: config.Recipe, resume: bool = False, restart: bool = False):
    from raytune_app.train.run import train, train_chain

    if recipe.chain:
        return train_chain(recipe, resume=resume, restart=restart)
    return train(recipe, resume=resume, restart=restart)


def _pairs(recipe: config.Recipe, args) -> dict:
    from raytune_app import storage
    from raytune_app.evaluate.run import candidates
    from raytune_app.train.pairs import build_pairs
    from raytune_app.train.settings import PairsSection

    settings = PairsSection(split=args.split, samples=args.samples, temperature=args.temperature)
    trained = [
        c
        for c in candidates(
            recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"include_base": False})}),
            args.adapter,
        )
        if c.weights
    ]
    out_dir = storage.absolute(args.out) if args.out else storage.join(storage.absolute(recipe.run_dir), "pairs")
    manifest = build_pairs(recipe, trained[-1].weights, trained[-1].identity, settings, out_dir)
    console.logger("pairs").info(
        f"train on them with a dpo recipe: data.kind: preference, data.sources: [{manifest['pairs_file']}], "
        "data.columns: {system: system}"
    )
    return manifest


def _tune(recipe: config.Recipe, resume: bool = False, restart: bool = False) -> dict:
    from raytune_app.tune.run import tune

    summary = tune(recipe, resume=resume, restart=restart)
    if not summary.get("interrupted"):
        where = summary.get("registered")
        console.logger("tune").info(
            f"best recipe: {summary['best_recipe']}; weights: {summary['best_weights']}"
            + (f"; registered as models:/{where['name']}/{where['version']}" if where else "")
            + f"; table {summary['table']}, plot {summary['plot']}"
        )
    return summary


def _show_evaluation(summary: dict) -> None:
    from raytune_app import storage
    from raytune_app.evaluate.run import comparison_table

    print(f"\n{summary['task']} metrics on {summary['data']} ({summary['examples']} examples):")
    print(comparison_table(summary))
    print(f"report: {storage.join(summary['output_dir'], 'report.md')}", flush=True)


def _register(recipe: config.Recipe) -> list[dict]:
    from raytune_app.registry.store import register_stage

    versions = register_stage(recipe)
    for v in versions:
        console.logger("register").info(
            f"models:/{v['name']}/{v['version']} (MLflow run {v['run_id']}); champion: version "
            f"{v['champion']}{' (promoted)' if v['promoted'] else ''}; store {v['tracking_uri']}"
        )
    return versions


def _registry(args) -> int:
    from raytune_app.registry import store

    if args.recipe_opt:
        uri = store.tracking_uri(config.load(args.recipe_opt))
    else:
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not uri:
            print(
                "error: say which registry: --recipe FILE, --tracking-uri URI or $MLFLOW_TRACKING_URI", file=sys.stderr
            )
            return EXIT_BAD_RECIPE
    result: dict | list[dict]
    if args.action == "list":
        result = store.list_models(uri)
    elif args.action == "show":
        result = store.show(uri, args.name, args.ref)
    elif args.action == "promote":
        result = store.promote(uri, args.name, args.ref, args.alias)
    else:
        result = store.rollback(uri, args.name, args.alias)
    print(json.dumps(result, indent=2, default=str))
    return 0


DEFAULT_GUARD_RECIPE = "recipes/guard.yaml"


def _guard(args) -> int:
    from raytune_app.guard.model import Guard, calibrate_guard, evaluate_guard, train_guard

    default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DEFAULT_GUARD_RECIPE)
    if args.recipe_opt or os.path.exists(default):
        recipe = config.load(args.recipe_opt or default)
    else:  # an installed package without the recipes folder: the guard section's defaults
        recipe = config.validate({"run": {"name": "guard"}, "data": {"generator": {"name": "order_extraction"}}})
    folder = getattr(args, "model", None) or recipe.stage_dir("guard")
    if args.action == "calibrate":
        with contextlib.redirect_stdout(sys.stderr):  # progress to stderr, the thresholds alone on stdout
            summary = calibrate_guard(recipe)
        print(json.dumps({"inference": summary["inference"], "thresholds": summary["thresholds"]}))
        return 0
    if args.action == "train" or (
        not getattr(args, "model", None) and not os.path.exists(os.path.join(folder, "guard.json"))
    ):
        with contextlib.redirect_stdout(sys.stderr if args.action != "train" else sys.stdout):
            in_process = getattr(args, "in_process", False)
            if not in_process:
                ensure_ray()
            train_guard(recipe, in_process=in_process)
        if args.action == "train":
            return 0
    if args.action == "eval":
        from raytune_app.guard.data import read_labelled

        rows = read_labelled(args.data, args.text_field, args.label_field)  # bad rows fail before the model loads
        print(
            json.dumps(
                evaluate_guard(Guard.load(folder, threads=os.cpu_count(), precision=args.precision), rows), indent=2
            )
        )
        return 0
    guard = Guard.load(folder, precision=args.precision)
    score = guard.scores([args.text])[0]
    print(
        json.dumps(
            {"score": round(score, 6), "threshold": round(guard.threshold, 6), "blocked": score >= guard.threshold}
        )
    )
    return 0


def _serve(recipe: config.Recipe, block: bool = True) -> None:
    """Start the Serve app of the recipe; the default guard is trained first when it is not there yet."""
    import time

    from raytune_app.serve import app as serve_app

    try:
        spec = serve_app.plan(recipe)
    except serve_app.GuardMissing as exc:
        default = config.ServeSection().guard
        guard_recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DEFAULT_GUARD_RECIPE)
        if (recipe.serve.guard.model, recipe.serve.guard.tracking_uri) != (
            default.model,
            default.tracking_uri,
        ) or not os.path.exists(guard_recipe):
            raise
        console.logger("serve").info(
            f"{str(exc).split(' (')[0]}: training the default guard first ({DEFAULT_GUARD_RECIPE}, a few "
            "minutes on a CPU; later starts reuse it)"
        )
        from raytune_app.guard.model import train_guard

        guard = config.load(guard_recipe, [f"run.output_dir={recipe.run.output_dir}"])
        train_guard(guard)
        spec = serve_app.plan(recipe)
    url = serve_app.run(recipe, spec=spec)
    request = json.dumps({"model": spec["router"]["name"], "messages": [{"role": "user", "content": "Hello"}]})
    console.logger("serve").info(
        f"{url}/v1 is up (models: {', '.join(spec['ingress']['models'])}; stats: {url}/v1/stats). Try:\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{request}'"
    )
    if not block:
        return
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def _fits(recipe: config.Recipe, args) -> int:
    """`validate --gpus N` / `--cluster FILE`: what fits the cluster, or exit 2 with what does not."""
    from raytune_app import fit

    gpus, cpus, where, groups = args.gpus, args.cpus, "", None
    if args.cluster:
        try:
            document = fit.load_cluster_file(args.cluster)
            found_gpus, found_cpus = fit.capacity(document)
            groups = fit.groups(document)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: --cluster {args.cluster}: {exc}", file=sys.stderr)
            return EXIT_BAD_RECIPE
        gpus = found_gpus if gpus is None else gpus
        cpus = found_cpus if cpus is None else cpus
        where = f" ({args.cluster} at its largest)"
    if gpus < 0 or (cpus is not None and cpus < 0):
        print("error: --gpus and --cpus must be 0 or more", file=sys.stderr)
        return EXIT_BAD_RECIPE
    report = fit.check(recipe, gpus, cpus, groups)
    size = f"{gpus} GPU(s)" + (f", {cpus} CPU(s)" if cpus is not None else "") + where
    for line in report.fits:
        print(f"  fits: {line}")
    for line in report.notes:
        print(f"  note: {line}")
    if not report.ok:
        print(
            f"{recipe.source_path or 'recipe'}: {len(report.problems)} thing(s) will not fit a cluster of {size}:\n  "
            + "\n  ".join(report.problems),
            file=sys.stderr,
        )
        return EXIT_BAD_RECIPE
    print(f"{recipe.source_path or 'recipe'}: fits a cluster of {size}")
    return 0


def _run_all(recipe: config.Recipe) -> None:
    """Every stage of run.stages in order, timed; at the end, what each stage reused, resumed or recomputed."""
    import time

    from raytune_app import outcomes
    from raytune_app.evaluate.run import evaluate

    timings, evaluation = {}, None
    outcomes.take()  # only this run's decisions
    for stage in recipe.run.stages:
        if stage == "serve":  # started last, after the summary, since it keeps running
            continue
        began = time.time()
        console.logger("run").info(f"{stage}: starting")
        with _stage_errors(recipe, stage):
            if stage == "prepare":
                _prepare(recipe)
            elif stage == "distill":
                _distill(recipe)
            elif stage == "train":
                _train(recipe)
            elif stage == "tune":
                _tune(recipe)
            elif stage == "evaluate":
                evaluation = evaluate(recipe)
            elif stage == "register":
                _register(recipe)
        timings[stage] = time.time() - began
    console.logger("run").info(
        "done: "
        + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items())
        + f"; total {sum(timings.values()):.0f} s"
    )
    console.logger("run").info(f"stages: {outcomes.summary_line(outcomes.take())}")
    if evaluation is not None:
        _show_evaluation(evaluation)
    if "serve" in recipe.run.stages:
        _serve(recipe)


@contextlib.contextmanager
def _stage_errors(recipe: config.Recipe, stage: str):
    """A full device anywhere in a stage (a Ray worker's write, a checkpoint upload, MLflow's copy) as one
    readable NoSpace error naming the run directory, instead of the library's traceback."""
    from raytune_app import storage

    try:
        yield
    except Exception as exc:
        if isinstance(exc, storage.NoSpace) or not storage.is_no_space(exc):
            raise
        raise storage.no_space(storage.absolute(recipe.run_dir), f"the {stage} stage", 0) from exc


def main(argv: list[str] | None = None) -> int:
    """`raytune-app ARGV`: the exit code. A mistake the user can fix (errors.RaytuneError, also when raised
    inside a Ray worker) is printed as its message alone, with its exit code (2: recipe, 4: data, 5: disk
    full, 1: cluster); anything else keeps its traceback, with a request to report it (exit 70)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    console.setup(args.verbosity)
    try:
        return _command(args)
    except Exception as exc:
        # The whole story goes to the run's log file (when there is one), whatever the console shows.
        console.record_failure(args.command, exc)
        where = f" (full log: {console.log_file()})" if console.log_file() else ""
        found = user_error(exc)
        if found is not None:
            print(f"error: {found}{where}", file=sys.stderr)
            return found.exit_code
        traceback.print_exc()
        print(f"error: {BUG_HINT}{where}", file=sys.stderr)
        return EXIT_BUG
    finally:
        console.detach_log_file()


def _command(args) -> int:
    if args.command == "registry":
        return _registry(args)
    if args.command == "guard":
        return _guard(args)
    if args.command == "validate" and args.explain and not (args.recipe_opt or args.recipe_file):
        print("\n".join(config.explain()))
        return 0
    recipe = config.load(_recipe_path(args), args.overrides)

    if args.command == "validate":
        if args.explain:
            print("\n".join(config.explain()))
        print(
            f"{recipe.source_path or 'recipe'}: valid; stages {', '.join(recipe.run.stages)}; run directory "
            f"{recipe.run_dir}"
        )
        if args.gpus is not None or args.cluster:
            return _fits(recipe, args)
        return 0

    # An empty search space is a valid recipe (the section's defaults), but nothing a search can run.
    if (
        args.command == "tune" or (args.command == "run" and "tune" in recipe.run.stages)
    ) and not recipe.tune.search_space:
        print(
            f"error: {recipe.source_path}: tune.search_space is empty; name the train fields to search, e.g. "
            "train.learning_rate: {loguniform: [1.0e-5, 1.0e-3]} (see recipes/tune_quickstart.yaml)",
            file=sys.stderr,
        )
        return EXIT_BAD_RECIPE

    from raytune_app.evaluate.run import evaluate

    if args.command == "export":  # no Ray: one process merges and writes
        from raytune_app.export.run import export

        export(
            recipe,
            fmt=args.export_format,
            out=args.out,
            adapter=args.adapter,
            dtype=args.dtype,
            quantization=args.quantization,
            register=args.register,
            force=args.force,
        )
        return 0
    if args.command == "evaluate" and args.data:
        # The metrics JSON is the only thing on stdout, so it can be piped; progress goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            _start(recipe)
            ensure_ray(recipe, args.command)
            summary = evaluate(recipe, data_file=args.data, adapter=args.adapter, force=args.force)
            _show_evaluation(summary)
        print(json.dumps(summary, indent=2))
        return 0
    _start(recipe)
    ensure_ray(recipe, args.command)
    if args.command == "run":
        _run_all(recipe)
        return 0
    with _stage_errors(recipe, args.command):
        if args.command == "prepare":
            _prepare(recipe, force=args.force)
        elif args.command == "distill":
            _distill(recipe, force=args.force)
        elif args.command == "train":
            _train(recipe, resume=args.resume, restart=args.restart)
        elif args.command == "tune":
            _tune(recipe, resume=args.resume, restart=args.restart)
        elif args.command == "evaluate":
            _show_evaluation(evaluate(recipe, adapter=args.adapter, force=args.force))
        elif args.command == "register":
            _register(recipe)
        elif args.command == "pairs":
            _pairs(recipe, args)
        elif args.command == "serve":
            _serve(recipe, block=not args.no_block)
    return 0


def run_job(command: str, argv: list[str] | None = None) -> int:
    """What each jobs/<stage>.py runs: `raytune-app <command> ARGV` joined to the existing cluster.

    The arguments are the CLI's (`--recipe FILE`, `key.sub=value` overrides, stage flags); the exit code
    is the CLI's (2: invalid recipe, reported before any Ray work; 4: bad data; 1: no cluster), so
    `ray job status` shows FAILED with the reason in `ray job logs`. A job entrypoint never starts a
    local Ray: it joins the job's cluster (raytune_app/cluster.py).
    """
    cluster.join_only()
    argv = list(sys.argv[1:] if argv is None else argv)
    where = "inside a Ray job" if cluster.in_ray_job() else "joining the running cluster"
    console.logger().info(f"job entrypoint: raytune-app {command} {' '.join(argv)} ({where})")
    return main([command, *argv])


if __name__ == "__main__":
    sys.exit(main())
