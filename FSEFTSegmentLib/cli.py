"""`fseft`: the command-line face of the engine. Parsing and printing only; work happens below.

Every user error ends as one line on stderr and the error's exit code (see errors.py); SIGTERM is
treated like Ctrl-C so a cancelled job (e.g. from the Slicer module) stops cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import Cancelled, FSEFTError, InputError, JobFailed
from .registry_file import default_model


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def cmd_predict(args) -> int:
    from .inference import InferenceSettings
    from .prediction import OUTPUT_FORMATS, predict_with_adapters
    from .progress import make_progress

    progress = make_progress(args.progress)
    formats = _split_list(args.format)
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown --format {','.join(unknown) or args.format!r}; choose from {', '.join(OUTPUT_FORMATS)}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise InputError(f"--sw-batch-size must be at least 1, got {args.sw_batch_size}")
    if not 0 <= args.overlap < 1:
        raise InputError(f"--overlap must be in [0, 1), got {args.overlap}")
    settings = InferenceSettings(
        sw_batch_size=args.sw_batch_size,
        overlap=args.overlap,
        largest_component=args.largest_component,
        precision=args.precision,
    )
    # with adapters and no --model, the base model is the one they were trained on
    model = args.model or (None if args.adapter else default_model())
    structures = _split_list(args.structures) if args.structures else None
    result = predict_with_adapters(model, args.adapter or [], args.inputs, Path(args.out), args.device, progress, structures, formats, settings)
    total = len(result.outputs) + len(result.failures)
    if total == 1 and result.failures:
        raise JobFailed(next(iter(result.failures.values())))
    if result.failures:
        raise JobFailed(f"{len(result.failures)} of {total} studies failed")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import (
        Scoring,
        evaluate,
        parse_structure_selectors,
        scores_table,
        write_scores_csv,
        write_scores_json,
    )

    selectors = parse_structure_selectors(args.structure or [])
    scoring = Scoring.from_options(args.scoring, args.image, args.model)
    scores = evaluate(args.pred, args.ref, selectors, tolerance_mm=args.tolerance, scoring=scoring)
    print(scores_table(scores, scoring.note(len(scores))))
    meta = {"pred": str(args.pred), "ref": str(args.ref), "tolerance_mm": args.tolerance, **scoring.meta(len(scores))}
    if args.json:
        write_scores_json(args.json, scores, meta)
    if args.csv:
        write_scores_csv(args.csv, scores)
    return 0


def cmd_models(args) -> int:
    from .model import download, registry
    from .progress import make_progress

    if args.action == "list":
        rows = registry.list_models()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        width = max([len(r["name"]) for r in rows] + [4])
        print(f"{'name':{width}}  {'status':15}  description")
        for row in rows:
            print(f"{row['name']:{width}}  {row['status']:15}  {row['description']}")
        return 0
    if args.action == "import":
        if not args.path or not args.name:
            raise InputError("usage: fseft models import PATH --name NAME")
        path = registry.import_model(args.path, args.name)
        print(f"imported {args.name}: {path}")
        return 0
    if not args.name:
        raise InputError("usage: fseft models pull NAME")
    path = download.pull_model(args.name, make_progress(args.progress), force=args.force)
    print(f"{args.name}: {path}")
    return 0


def cmd_adapters(args) -> int:
    from . import adapter_library as library

    if args.action == "list":
        root = Path(args.root).expanduser() if args.root else library.adapters_home()
        rows = library.list_adapters(root)
        print(json.dumps(rows, indent=2) if args.json else library.adapters_table(rows, root))
    elif args.action == "export":
        print(library.export_adapter(args.adapter, args.zip))
    elif args.action == "import":
        print(library.import_adapter(args.zip, args.root))
    else:
        print(f"deleted {library.delete_adapter(args.adapter, args.root)}")
    return 0


def cmd_device(args) -> int:
    from .inference import device_report

    report = device_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"torch {report['torch']} ({report['build']}); CUDA available: {'yes' if report['cuda_available'] else 'no'}")
    for gpu in report["gpus"]:
        memory = gpu.get("error") or f"{gpu['free_bytes'] / 2**30:.1f} GiB free of {gpu['total_bytes'] / 2**30:.1f} GiB"
        print(f"GPU {gpu['index']}: {gpu['name']}, {memory}")
    print(f"CPU: {report['cpu_threads']} PyTorch threads on {report['cpu_count']} logical CPUs; "
          f"native bf16: {'yes' if report['native_bf16_cpu'] else 'no (emulated: use fp32)'}")
    return 0


def cmd_adapt(args) -> int:
    from .adaptation import parse_support, parse_target, run_adaptation
    from .io.files import ensure_folder
    from .adapters import save_adapter
    from .inference import choose_device
    from .io.studies import default_id
    from .methods import get_method
    from .model import load_foundation_model
    from .model.registry import model_sha256
    from .progress import make_progress
    from .training import TrainingSettings

    progress = make_progress(args.progress)
    get_method(args.method)  # an unknown method fails before anything is loaded
    targets = [parse_target(text) for text in args.structure or []]
    supports = [parse_support(image, labels) for image, labels in args.support or []]
    out = Path(args.out)
    settings = TrainingSettings(
        max_epochs=args.max_epochs,
        seed=args.seed,
        size_prior=args.size_prior,
        size_prior_gamma=args.size_prior_gamma,
        size_prior_weight=args.size_prior_weight,
        size_prior_mode=args.size_prior_mode,
        precision=args.precision,
        feature_cache=False if args.no_feature_cache else None,
        **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
        **({"crops_per_step": args.crops_per_step} if args.crops_per_step else {}),
    )

    def adapter_path(query_id: str | None) -> Path:  # one adapter, or one per query (episodes): OUT-<query id> beside OUT
        return out.parent / f"{out.name}-{query_id}" if query_id else out

    queries = args.query or []
    for folder in [adapter_path(default_id(q)) for q in queries] if settings.adapts_per_query(len(queries)) else [out]:
        if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / "adapter.json").exists())):
            raise InputError("exists and is not an adapter folder; choose a new --out", folder)
    ensure_folder(out.parent)  # before minutes of training, not after
    device = choose_device(args.device)
    args.model = args.model or default_model()
    progress.info(f"loading model {args.model}")
    network = load_foundation_model(args.model)
    base = {"name": str(args.model), "sha256": model_sha256(args.model), "architecture": network.architecture.to_dict()}
    runs = run_adaptation(
        network, base, args.method, targets, supports, [Path(q) for q in queries],
        settings, device, progress, tune_decoder=args.tune_decoder, softmax=args.head == "softmax",
    )
    saved = []
    for run in runs:
        folder = adapter_path(run.query)
        try:
            saved.append(save_adapter(folder, run.model, run.metadata))
        except OSError as error:
            raise InputError(f"cannot write the adapter ({error.strerror or error})", folder) from None
    for run in runs:
        for structure, prior in (run.result.size_prior or {}).items():
            low, high = prior["range_ml"]
            sizes = ", ".join(f"{query} {size['ml']:.1f} mL" for query, size in prior["queries"].items())
            progress.info(f"size prior {structure}: S = {prior['prior_ml']:.1f} mL (allowed {low:.1f}-{high:.1f} mL); predicted: {sizes}", size_prior={structure: prior})
    if args.predict_queries and args.query:
        from .prediction import predict_with_adapters

        for path, run in zip(saved, runs):
            inputs = [q for q in queries if default_id(q) == run.query] if run.query else queries
            predict_with_adapters(network_ref=args.model, adapters=[path], inputs=inputs, out=path / "predictions", device=device, progress=progress)
    for path in saved:
        progress.emit("adapter", path=str(path), message=f"adapter written to {path}")
    return 0


def cmd_methods(args) -> int:
    import json

    from .methods.summary import method_summaries, summaries_table
    from .model.network import Architecture
    from .model.registry import load_registry

    registry = load_registry()
    args.model = args.model or default_model()
    if args.model in registry:
        architecture = registry[args.model].architecture
    else:
        from .model import load_foundation_model

        architecture = load_foundation_model(args.model).architecture if args.model else Architecture()
    rows = method_summaries(architecture, structures=args.structures, tune_decoder=args.tune_decoder)
    print(json.dumps(rows, indent=2) if args.json else summaries_table(rows))
    return 0


def cmd_pretrain(args) -> int:
    from .pretraining.config import PretrainConfig
    from .pretraining.loop import export_model, pretrain_until_signalled, validate_checkpoint
    from .pretraining.validation import table
    from .progress import make_progress

    config = PretrainConfig.from_yaml(args.config)
    if args.export:
        exported = export_model(config, args.export, args.checkpoint)
        print(f"exported step {exported['steps']} of {exported['total_steps']} to {exported['path']}")
        return 0
    if args.validate:
        result = validate_checkpoint(config, args.checkpoint)
        print(json.dumps(result) if args.progress == "json" else f"step {result['step'] if result['step'] is not None else '?'}, {result['volumes']} validation volumes\n{table(result)}")
        return 0
    if args.checkpoint:
        raise InputError("--checkpoint goes with --export or --validate (training resumes from the run's own checkpoint)", args.checkpoint)
    pretrain_until_signalled(config, make_progress(args.progress))
    return 0


def cmd_demo(args) -> int:
    from .demo import default_out_dir, results_table, run_demo
    from .inference import choose_device
    from .progress import make_progress

    out = Path(args.out) if args.out else default_out_dir()
    results = run_demo(out, quick=args.quick, device=choose_device(args.device), progress=make_progress(args.progress))
    print(results_table(results))
    print(f"demo outputs (phantoms, predictions, report.png, results.json): {out.absolute()}")
    return 0


def cmd_experiment(args) -> int:
    from .experiment import load_config, run_experiment
    from .progress import make_progress

    def numbers(text: str | None, option: str) -> list[int] | None:
        try:
            return None if text is None else [int(item) for item in _split_list(text)]
        except ValueError:
            raise InputError(f"--{option} {text!r}: expected comma-separated whole numbers") from None

    config = load_config(args.config).narrowed(
        tasks=_split_list(args.tasks) if args.tasks else None,
        methods=_split_list(args.methods) if args.methods else None,
        shots=numbers(args.shots, "shots"),
        draws=numbers(args.draws, "draws"),
    )
    out = Path(args.out) if args.out else Path(f"fseft-experiment-{config.name}")
    result = run_experiment(config, out, args.device, make_progress(args.progress), dry_run=args.dry_run)
    if result.table:
        print(result.table)
        print(f"results (runs/, runs.csv, table.md, plots/): {out.absolute()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fseft", description="Few-shot CT organ segmentation with a foundation model.")
    parser.add_argument("--version", action="version", version=f"fseft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="segment CT studies with a model")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, DICOM folder, or study list (.txt / .csv with id,image)")
    predict.add_argument("--model", help="registered model name or checkpoint path (default: the adapters' base model, else the registry's default model)")
    predict.add_argument("--adapter", action="append", metavar="DIR", help="adapter folder to apply (repeatable: black-box adapters share one backbone pass)")
    predict.add_argument("--structures", help="comma-separated structures to output (default: all the adapters' structures, else all the model knows)")
    predict.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    predict.add_argument("--format", default="seg.nrrd", help="seg.nrrd, nii.gz (label map + JSON table) or both, comma-separated")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    predict.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    predict.add_argument("--largest-component", action="store_true", help="keep only what lies inside the patient's body, then each structure's largest 26-connected component")
    predict.add_argument("--sw-batch-size", type=int, help="windows per forward pass (default: 1 on the CPU, 2 on CUDA)")
    predict.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default: %(default)s)")
    predict.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="auto: mixed precision on CUDA, fp32 on the CPU")
    predict.set_defaults(run=cmd_predict)

    evaluate = commands.add_parser("evaluate", help="Dice, surface Dice and HD95 of a prediction against a reference")
    evaluate.add_argument("--pred", required=True, type=Path)
    evaluate.add_argument("--ref", required=True, type=Path)
    evaluate.add_argument("--structure", action="append", metavar="NAME=VALUE", help="structure and its label value (repeatable)")
    evaluate.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default: %(default)s)")
    evaluate.add_argument("--scoring", choices=("native", "paper"), default="native",
                          help="native: on the reference's grid, Dice 2TP/(|P|+|G|); paper: as the paper, in the model space of "
                          "--image, Dice 2TP/(|P|+|G|+1), one structure's reference cut to its largest component (default: %(default)s)")
    evaluate.add_argument("--image", type=Path, help="--scoring paper: the CT the prediction was made on")
    evaluate.add_argument("--model", help="--scoring paper: registered model name or checkpoint path whose spacing and HU window define "
                          "the model space; its weights are not read (default: the registry's default model)")
    evaluate.add_argument("--json", type=Path, help="also write the scores as JSON")
    evaluate.add_argument("--csv", type=Path, help="also write the scores as CSV")
    evaluate.set_defaults(run=cmd_evaluate)

    adapt = commands.add_parser("adapt", help="adapt the model to structures from a few annotated studies")
    adapt.add_argument("--model", help="registered model name or checkpoint path (default: the registry's default model)")
    adapt.add_argument("--method", required=True, help="linear-probe, spatial-adapter, adapter-1x1, bitfit, affine-ln, lora, adaptformer, full, or the 2023 workshop's adapter-2023 and ft-last (see: fseft methods)")
    adapt.add_argument("--tune-decoder", action="store_true", help="also fine-tune the decoder (the paper's decoder fine-tuning)")
    adapt.add_argument("--head", choices=("sigmoid", "softmax"), default="sigmoid",
                       help="sigmoid: one output per structure, structures may overlap; softmax: one class per voxel, background "
                       "included, argmax at prediction (the paper's multi-organ head; labels must not overlap) (default: %(default)s)")
    adapt.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "LABELS"), help="an annotated study: image and label map[:VALUE] or .seg.nrrd[:SEGMENT] (repeatable)")
    adapt.add_argument("--structure", action="append", metavar="NAME[=VALUE]", help="target structure (repeatable); VALUE/SEGMENT selects it in the label files")
    adapt.add_argument("--query", action="append", metavar="IMAGE", help="unlabelled study for transductive inference / prediction (repeatable)")
    adapt.add_argument("--size-prior", action="store_true", help="constrain query sizes with the supports' size prior (black-box methods)")
    adapt.add_argument("--size-prior-gamma", type=float, default=0.3, help="tolerance around the prior size (default: %(default)s)")
    adapt.add_argument("--size-prior-weight", type=float, default=0.1, help="weight lambda of the size-prior term (default: %(default)s)")
    adapt.add_argument("--size-prior-mode", choices=("per-query", "joint"), default="per-query",
                       help="per-query: one adapter per query, OUT-<query id> each (the paper's transductive episodes; "
                       "one query: OUT); joint: one adapter for all the queries, their size terms averaged (default: %(default)s)")
    adapt.add_argument("--predict-queries", action="store_true", help="also segment the queries into OUT/predictions")
    adapt.add_argument("--out", required=True, help="adapter folder to write")
    adapt.add_argument("--seed", type=int, default=0)
    adapt.add_argument("--max-epochs", type=int, help="upper bound; early stopping usually ends sooner (default: 200; the 2023 workshop methods: 100)")
    adapt.add_argument("--learning-rate", type=float, help="override the method's default learning rate")
    adapt.add_argument("--crops-per-step", type=int, help="random crops per step (default: 6, as the paper)")
    adapt.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="gradient steps' precision, recorded in the adapter. auto: bf16 on CUDA and, for head steps on cached "
                       "features, on CPUs with native bf16; fp32 elsewhere (default: %(default)s)")
    adapt.add_argument("--no-feature-cache", action="store_true",
                       help="black-box methods: run the frozen backbone on every crop, with the intensity-shift augmentation, "
                       "as the paper's code (slower; default: features computed once per support)")
    adapt.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    adapt.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    adapt.set_defaults(run=cmd_adapt)

    methods = commands.add_parser("methods", help="what each adaptation method trains and costs")
    methods.add_argument("--model", help="registry name (no download needed) or checkpoint path (default: the registry's default model)")
    methods.add_argument("--structures", type=int, default=1, help="number of target structures (default: %(default)s)")
    methods.add_argument("--tune-decoder", action="store_true")
    methods.add_argument("--json", action="store_true", help="print JSON instead of a table")
    methods.set_defaults(run=cmd_methods)

    pretrain = commands.add_parser("pretrain", help="supervised pretraining over partially labelled datasets (resumable; torchrun for several GPUs)")
    pretrain.add_argument("--config", required=True, help="YAML file: datasets, label templates, schedule, output folder")
    pretrain.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    pretrain.add_argument("--export", metavar="FILE.safetensors", help="instead of training: write the run's latest weights (with their architecture) to this file")
    pretrain.add_argument("--validate", action="store_true", help="instead of training: print the per-class Dice of the run's latest weights on its validation volumes")
    pretrain.add_argument("--checkpoint", metavar="FILE.pt", help="with --export or --validate: this checkpoint instead of the latest (e.g. checkpoint-best.pt); --validate also takes exported .safetensors weights")
    pretrain.set_defaults(run=cmd_pretrain)

    experiment = commands.add_parser("experiment", help="the paper's few-shot protocol: structures x K x draws x methods, resumable, one table")
    experiment.add_argument("--config", required=True, help="experiment YAML (see Resources/experiments/)")
    experiment.add_argument("--out", help="results folder; a rerun into it skips finished runs (default: fseft-experiment-<name> here)")
    experiment.add_argument("--tasks", help="only these tasks of the config (comma-separated)")
    experiment.add_argument("--methods", help="only these methods of the config (comma-separated)")
    experiment.add_argument("--shots", help="only these K values of the config (comma-separated)")
    experiment.add_argument("--draws", help="only these draw seeds of the config (comma-separated)")
    experiment.add_argument("--device", help="auto, cpu or cuda (default: the config's, else auto)")
    experiment.add_argument("--dry-run", action="store_true", help="check the config and print what would run, then stop")
    experiment.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    experiment.set_defaults(run=cmd_experiment)

    demo = commands.add_parser("demo", help="offline demo: adapt the bundled model on phantoms with four methods, K = 1 and 5 (about 5 minutes on a CPU)")
    demo.add_argument("--quick", action="store_true", help="smaller phantoms, K = 1 and 2, a few steps (under a minute)")
    demo.add_argument("--out", help="output folder, new or empty (default: fseft-demo-<date>-<time> here)")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    demo.add_argument("--progress", choices=("bar", "none"), default="bar")
    demo.set_defaults(run=cmd_demo)

    models = commands.add_parser("models", help="list, import or download models")
    models.add_argument("action", choices=("list", "import", "pull"))
    models.add_argument("target", nargs="?", help="PATH for import, NAME for pull")
    models.add_argument("--name", help="name for an imported model")
    models.add_argument("--force", action="store_true", help="download again even if present")
    models.add_argument("--json", action="store_true", help="list: print JSON (what the Slicer module reads)")
    models.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    models.set_defaults(run=cmd_models)

    adapters = commands.add_parser("adapters", help="list, export, import or delete saved adapters")
    actions = adapters.add_subparsers(dest="action", required=True)
    root_help = "adapters folder (default: $FSEFT_ADAPTERS, else adapters/ in the per-user fseft folder)"
    listing = actions.add_parser("list", help="the saved adapters, newest first")
    listing.add_argument("--root", help=root_help)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    export = actions.add_parser("export", help="write an adapter (its two files only) to a zip")
    export.add_argument("adapter", metavar="ADAPTER", help="name of a saved adapter, or an adapter folder")
    export.add_argument("zip", metavar="ZIP")
    install = actions.add_parser("import", help="check an adapter zip and add it to the adapters folder")
    install.add_argument("zip", metavar="ZIP")
    install.add_argument("--root", help=root_help)
    delete = actions.add_parser("delete", help="remove a saved adapter")
    delete.add_argument("adapter", metavar="ADAPTER", help="name of a saved adapter, or its folder")
    delete.add_argument("--root", help=root_help)
    adapters.set_defaults(run=cmd_adapters)

    device = commands.add_parser("device", help="what PyTorch can compute on: build, GPUs and their free memory, CPU")
    device.add_argument("--json", action="store_true", help="print JSON (what the Slicer module reads)")
    device.set_defaults(run=cmd_device)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        args.path = args.target if args.action == "import" else None
        args.name = args.name if args.action == "import" else args.target
    signal.signal(signal.SIGTERM, _terminate)
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 console must not turn "×" or "–" in a table into a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        return args.run(args)
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        error = Cancelled("cancelled; no partial output was written")
        print(f"fseft: {error}", file=sys.stderr)
        return error.exit_code
    except FSEFTError as error:
        if args.debug:
            raise
        kind = "" if isinstance(error, Cancelled) else "error: "  # a stop the user asked for is no error
        print(f"fseft: {kind}{error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
