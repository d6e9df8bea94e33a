"""`fseft`: the command-line face of the engine. Parsing and printing only; work happens below.

Every user error ends as one line on stderr and the error's exit code (see errors.py); SIGTERM is
treated like Ctrl-C so a cancelled job (e.g. from the Slicer module) stops cleanly.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import __version__
from .errors import Cancelled, FSEFTError, InputError, JobFailed

DEFAULT_MODEL = "fseft-swinunetr"


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def cmd_predict(args) -> int:
    from .inference import InferenceSettings, SegmentationPredictor, choose_device
    from .io.studies import expand_inputs
    from .labels import resolve_structures
    from .model import load_foundation_model
    from .model.network import head_rows
    from .prediction import OUTPUT_FORMATS, model_structures, predict_studies
    from .progress import make_progress

    progress = make_progress(args.progress)
    formats = _split_list(args.format)
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown --format {','.join(unknown) or args.format!r}; choose from {', '.join(OUTPUT_FORMATS)}")
    studies = expand_inputs(args.inputs)
    device = choose_device(args.device)
    progress.info(f"loading model {args.model}")
    network = load_foundation_model(args.model)
    available = model_structures(network.architecture)
    if args.structures:
        wanted = resolve_structures(_split_list(args.structures))
        names = [s.name for s in available]
        absent = [s.name for s in wanted if s.name not in names]
        if absent:
            raise InputError(f"model {args.model} has no output for {', '.join(absent)}; it segments: {', '.join(names)}")
        channels = [names.index(s.name) for s in wanted]
    else:
        channels = list(range(len(available)))
    structures = [available[c] for c in channels]
    settings = InferenceSettings(
        sw_batch_size=args.sw_batch_size,
        overlap=args.overlap,
        largest_component=args.largest_component,
        precision=args.precision,
    )
    predictor = SegmentationPredictor(network, device, settings, progress)
    progress.info(f"segmenting {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} on {device} ({len(structures)} structures)")
    result = predict_studies(predictor, [head_rows(network.classifier, channels)], structures, studies, Path(args.out), formats, progress)
    if len(studies) == 1 and result.failures:
        raise JobFailed(next(iter(result.failures.values())))
    if result.failures:
        raise JobFailed(f"{len(result.failures)} of {len(studies)} studies failed")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate, parse_structure_selectors, scores_table, write_scores_csv, write_scores_json

    selectors = parse_structure_selectors(args.structure or [])
    scores = evaluate(args.pred, args.ref, selectors, tolerance_mm=args.tolerance)
    print(scores_table(scores))
    meta = {"pred": str(args.pred), "ref": str(args.ref), "tolerance_mm": args.tolerance}
    if args.json:
        write_scores_json(args.json, scores, meta)
    if args.csv:
        write_scores_csv(args.csv, scores)
    return 0


def cmd_models(args) -> int:
    from .model import registry
    from .progress import make_progress

    if args.action == "list":
        rows = registry.list_models()
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
    path = registry.pull_model(args.name, make_progress(args.progress), force=args.force)
    print(f"{args.name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fseft", description="Few-shot CT organ segmentation with a foundation model.")
    parser.add_argument("--version", action="version", version=f"fseft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="segment CT studies with a model")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, DICOM folder, or study list (.txt / .csv with id,image)")
    predict.add_argument("--model", default=DEFAULT_MODEL, help="registered model name or checkpoint path (default: %(default)s)")
    predict.add_argument("--structures", help="comma-separated structures to output (default: all the model knows)")
    predict.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    predict.add_argument("--format", default="seg.nrrd", help="seg.nrrd, nii.gz (label map + JSON table) or both, comma-separated")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    predict.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    predict.add_argument("--largest-component", action="store_true", help="keep each structure's largest 26-connected component")
    predict.add_argument("--sw-batch-size", type=int, default=2, help="windows per forward pass (default: %(default)s)")
    predict.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default: %(default)s)")
    predict.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="auto: mixed precision on CUDA, fp32 on the CPU")
    predict.set_defaults(run=cmd_predict)

    evaluate = commands.add_parser("evaluate", help="Dice, surface Dice and HD95 of a prediction against a reference")
    evaluate.add_argument("--pred", required=True, type=Path)
    evaluate.add_argument("--ref", required=True, type=Path)
    evaluate.add_argument("--structure", action="append", metavar="NAME=VALUE", help="structure and its label value (repeatable)")
    evaluate.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in mm (default: %(default)s)")
    evaluate.add_argument("--json", type=Path, help="also write the scores as JSON")
    evaluate.add_argument("--csv", type=Path, help="also write the scores as CSV")
    evaluate.set_defaults(run=cmd_evaluate)

    models = commands.add_parser("models", help="list, import or download models")
    models.add_argument("action", choices=("list", "import", "pull"))
    models.add_argument("target", nargs="?", help="PATH for import, NAME for pull")
    models.add_argument("--name", help="name for an imported model")
    models.add_argument("--force", action="store_true", help="download again even if present")
    models.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    models.set_defaults(run=cmd_models)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        args.path = args.target if args.action == "import" else None
        args.name = args.name if args.action == "import" else args.target
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        error = Cancelled("cancelled; no partial output was written")
        print(f"fseft: {error}", file=sys.stderr)
        return error.exit_code
    except FSEFTError as error:
        if args.debug:
            raise
        print(f"fseft: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
