"""The one prepared run on a lent GPU machine: CUDA paths checked, GPU timings, the bundled model trained on.

A GPU is lent to some issues by chance, 15 minutes of device time in all (DEVELOPERS.md). This script
spends them in ONE call of the device tool, in three steps, each bounded in time and each leaving its
results under $OUT before the next starts (a later step that fails or runs out of time loses
nothing earlier):

1. `cuda-tests`: Testing/test_cuda.py (prediction under autocast, a forced CUDA out-of-memory
   error falling back to the CPU, linear-probe and LoRA adaptation on CUDA, `fseft demo --quick
   --device cuda`), outcomes per test from pytest's JUnit XML;
2. `timings`: benchmarks/predict.py (the full-size network, random weights, on the real abdomen CT:
   ours against the plain MONAI loop) and benchmarks/adapt.py (spatial-adapter and LoRA steps with
   the peak GPU memory of each), ratios against their baselines in the same run;
3. `pretraining`: the bundled model's pretraining continued from the shipped weights for the rest
   of the time (`fseft-mini.yaml`'s recipe with new syntheses, a batch sized for the GPU, volumes
   synthesised on every core in the background, validation every quarter of the run, the shipped
   weights scored first on the same validation volumes). The best checkpoint comes back only if it
   beats them, exported and split into parts under the 16 MiB-per-file limit, with validation.jsonl.

Usage (from the project root):

    make device-pack            # here: the wheels the GPU image lacks, SimpleITK (xz), the data -> .device/
    # device tool: run(command="make device", carry=[".device"], timeout_s=540)
    make device-collect FROM=<files_at of that reply>   # here: benchmarks/results/device.json, candidate weights
    make device-dry             # here, on the CPU: every step with tiny counts, the CUDA ones skipped

`run` installs what the GPU image lacks from .device/ itself (no network there), so `make device`
needs nothing but the machine's own python3 with PyTorch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".device"  # ignored by git; travels with `carry`
SITE = Path(tempfile.gettempdir()) / "fseft-device-site"
SCRATCH = Path(tempfile.gettempdir()) / "fseft-device-scratch"
#: importable name -> distribution, for what the GPU image lacks (../.library/device/KINDS.md lists it)
MISSING_THERE = {"monai": "monai", "nibabel": "nibabel", "pydicom": "pydicom", "nrrd": "pynrrd", "slicerio": "slicerio"}
SIMPLEITK_ARCHIVE = "simpleitk.tar.xz"  # 28 MB instead of the wheel's 53: the whole tree must fit 64 MiB
TRAVEL_LIMIT = 64 * 2**20
FILE_LIMIT = 16 * 2**20
PART_LIMIT = 15 * 2**20
DATA_FILES = ["README.md", "label-maps/btcv-abdct/*.nii.gz", "label-maps/amos/*.nii.gz",
              "real-ct/totalseg-abdomen/ct.nii.gz", "real-ct/totalseg-abdomen/labels-totalsegmentator.nii.gz"]
SHIPPED = ROOT / "Resources" / "models" / "fseft-mini" / "fseft-mini.safetensors"
RECIPE = ROOT / "Resources" / "pretraining" / "fseft-mini.yaml"
RESULTS = "device-results.json"
TOTAL_SECONDS = 520  # inside the call's timeout_s of 540
#: seconds each step may take at most (the last takes whatever is left)
BUDGETS = {"cuda-tests": 150, "timings": 150}
PREDICT_VARIANTS = {"cuda": "baseline,ours-fp32,ours-auto", "cpu": "baseline,ours-fp32"}
ADAPT_VARIANTS = {"cuda": "lp-cache,sa-recompute,sa-cache,lora", "cpu": "lp-cache,sa-recompute,lora"}
#: the GPU run's batch: 8 volumes x 2 crops of 64^3 (the CPU runs used 2 x 1)
GPU_BATCH = {"volumes_per_step": 8, "crops_per_volume": 2}
DRY_STEPS_PER_EPOCH = 2  # marks a dry run's config (a real run has 100)


# ------------------------------------------------------------------------------------ pack (here)


def pack() -> None:
    """Fill .device/ with what the GPU machine lacks and check that the tree that travels fits."""
    from importlib.metadata import version

    wheels = PACK / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in MISSING_THERE.values()]
    print(f"wheels: {', '.join(pins)}", flush=True)
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64", "-d"]
    subprocess.run(download + [str(wheels), *pins], check=True)
    archive = PACK / SIMPLEITK_ARCHIVE
    simpleitk = f"SimpleITK=={version('SimpleITK')}"
    stamp = PACK / "simpleitk.version"
    if not archive.is_file() or not stamp.is_file() or stamp.read_text() != simpleitk:
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run(download + [scratch, simpleitk], check=True)
            (wheel,) = Path(scratch).glob("*.whl")
            shutil.unpack_archive(wheel, Path(scratch) / "tree", "zip")
            print(f"compressing {wheel.name} with xz (a few minutes)", flush=True)
            with tarfile.open(archive.with_suffix(".tmp"), "w:xz", preset=9) as tar:
                for member in sorted((Path(scratch) / "tree").iterdir()):
                    tar.add(member, arcname=member.name)
            os.replace(archive.with_suffix(".tmp"), archive)
            stamp.write_text(simpleitk)
    data = ROOT.parent / "shared" / "data"
    for pattern in DATA_FILES:
        sources = sorted(data.glob(pattern))
        if not sources:
            sys.exit(f"{data / pattern}: missing (the shared data must be beside the project)")
        for source in sources:
            target = PACK / "data" / source.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    size = travelling_bytes()
    print(f"the tree that travels: {size / 2**20:.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f}", flush=True)
    if size > TRAVEL_LIMIT:
        sys.exit("too large for the device tool: carry less")


def travelling_bytes() -> int:
    """Tracked and untracked-not-ignored files plus .device/: what one device call sends."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    files = [ROOT / os.fsdecode(name) for name in listed if name]
    files += [path for path in PACK.rglob("*") if path.is_file()]
    return sum(path.stat().st_size for path in files if path.is_file())


# ---------------------------------------------------------------------------- run (there, or dry here)


def bootstrap(argv: list[str]) -> None:
    """Install what this Python lacks from .device/ into a private folder and restart with it."""
    if all(importlib.util.find_spec(name) for name in [*MISSING_THERE, "SimpleITK"]):
        return
    if os.environ.get("FSEFT_DEVICE_BOOTSTRAPPED") or not PACK.is_dir():
        sys.exit(f"missing packages and no usable {PACK} (run `make device-pack` here and carry .device)")
    print(f"installing from {PACK} into {SITE}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, sorted((PACK / "wheels").glob("*.whl")))], check=True)
    with tarfile.open(PACK / SIMPLEITK_ARCHIVE) as tar:
        tar.extractall(SITE, filter="data")
    paths = [str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")]
    os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, paths)), FSEFT_DEVICE_BOOTSTRAPPED="1")
    os.execv(sys.executable, [sys.executable, *argv])


class Run:
    """The results file and the log under OUT, written as each step ends."""

    def __init__(self, out: Path, dry_run: bool):
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + TOTAL_SECONDS
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "run.log", "a", encoding="utf-8")
        self.results: dict = {"dry_run": dry_run, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def save(self) -> None:
        temporary = self.out / (RESULTS + ".tmp")
        temporary.write_text(json.dumps(self.results, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, self.out / RESULTS)

    def bounded(self, command: list[str], seconds: float, environment: dict | None = None) -> dict:
        """Run `command` (its output into the log) for at most `seconds`; its process group is killed after."""
        self.say(f"$ {' '.join(command)}   (at most {seconds:.0f} s)")
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})}, start_new_session=True)
        timer = threading.Timer(max(seconds, 1), lambda: os.killpg(process.pid, signal.SIGKILL))
        timer.start()
        try:
            for line in process.stdout:
                self.say("  " + line.rstrip())
            code = process.wait()
        finally:
            timer.cancel()
        elapsed = time.monotonic() - started
        timed_out = code == -signal.SIGKILL and elapsed >= seconds - 1
        return {"returncode": code, "seconds": round(elapsed, 1), "timed_out": timed_out}

    def step(self, name: str, function, *args) -> None:
        """One step: its record saved whatever happens inside it."""
        self.say(f"\n=== {name} ({self.left():.0f} s left)")
        started = time.monotonic()
        try:
            record = function(self, *args)
        except Exception as error:  # a broken step must not cost the later ones
            record = {"status": "error", "error": f"{type(error).__name__}: {error}"}
        record["step_seconds"] = round(time.monotonic() - started, 1)
        self.results["steps"][name] = record
        self.save()
        self.say(f"=== {name}: {record.get('status')} in {record['step_seconds']} s")


def environment_record() -> dict:
    import torch

    from FSEFTSegmentLib.inference import device_report

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cpu_count": os.cpu_count(), **device_report()}


def cuda_tests(run: Run) -> dict:
    report = SCRATCH / "cuda-tests.xml"
    outcome = run.bounded([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "Testing/test_cuda.py",
                           f"--junitxml={report}"], min(BUDGETS["cuda-tests"], run.left() - 60))
    tests = {}
    if report.is_file():
        for case in ElementTree.parse(report).iter("testcase"):
            verdict = next(iter(case), None)
            tests[case.get("name")] = {
                "outcome": "passed" if verdict is None else verdict.tag,
                "seconds": round(float(case.get("time", 0)), 1),
                **({"message": (verdict.get("message") or "")[:500]} if verdict is not None else {}),
            }
        shutil.copy2(report, run.out / "cuda-tests.xml")
    outcomes = {test["outcome"] for test in tests.values()}
    status = ("skipped" if outcomes == {"skipped"} else "passed" if outcome["returncode"] == 0 and tests else "failed")
    return {"status": status, **outcome, "tests": tests}


def timings(run: Run, device: str, dry_run: bool) -> dict:
    record: dict = {"status": "passed", "device": device}
    quick = ["--quick"] if dry_run else []
    for name, script, variants, share in (("predict", "predict.py", PREDICT_VARIANTS, 0.5), ("adapt", "adapt.py", ADAPT_VARIANTS, 1.0)):
        target = SCRATCH / f"{name}.json"
        budget = min(BUDGETS["timings"] * share, run.left() - 60)
        extra = ["--steps", "3"] if name == "adapt" and not dry_run else []
        outcome = run.bounded([sys.executable, f"benchmarks/{script}", "--device", device, "--variants", variants[device],
                               *quick, *extra, "--json", str(target)], budget)
        record[name] = {**outcome, "results": json.loads(target.read_text()) if target.is_file() else None}
        if outcome["returncode"] != 0:
            record["status"] = "failed"
    return record


def pretraining_config(dry_run: bool, data: Path, out: Path) -> dict:
    """fseft-mini.yaml's recipe continued from the shipped weights: new syntheses (seed 2, more
    variants), the GPU batch, every core synthesising; `steps` is set after calibration."""
    import yaml

    config = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    for key in ("epochs", "hold_lr_until_dice"):
        config.pop(key, None)
    config.update(out=str(out), init=str(SHIPPED), seed=2, lr=3.0e-4, warmup_epochs=1, steps_per_epoch=100, checkpoint_every=100,
                  volume_cache=False, precision="auto", synthesis_workers=max(1, (os.cpu_count() or 2) - 1), **GPU_BATCH)
    variants = {"btcv-synthetic": 6, "amos-synthetic": 24}
    for dataset in config["datasets"]:
        dataset["labels"] = str(data / Path(dataset["labels"]).relative_to("../../../shared/data"))
        dataset["synthesize"] = variants[dataset["name"]]
    if dry_run:  # seconds, not minutes: two maps of one dataset, one of the other, one variant each
        import glob

        config.update(volumes_per_step=1, crops_per_volume=1, synthesis_workers=2, steps_per_epoch=DRY_STEPS_PER_EPOCH, checkpoint_every=2)
        for dataset in config["datasets"]:
            dataset["labels"] = sorted(glob.glob(dataset["labels"]))[:2]
            dataset.update(synthesize=1, validation=1)
    return config


def calibrate(config: dict) -> dict:
    """Seconds of one training step of the config's batch on this device (random crops, after a
    warm-up): the run's length is sized from it. Halves the batch while CUDA runs out of memory."""
    import torch

    from FSEFTSegmentLib.model.network import Architecture, FoundationSwinUNETR
    from FSEFTSegmentLib.pretraining.loop import pretraining_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    architecture = Architecture.from_dict(config["architecture"])
    network = FoundationSwinUNETR(architecture).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    dtype = pretraining_dtype(config["precision"], device)
    size = architecture.patch_size
    while True:
        batch = config["volumes_per_step"] * config["crops_per_volume"]
        try:
            images = torch.randn(batch, 1, size, size, size, device=device)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = network(images).float().sigmoid().mean()
                loss.backward()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            return {"crops_per_step": batch, "step_seconds": round(min(times[1:]), 4), "peak_gpu_mb": peak and round(peak)}
        except torch.cuda.OutOfMemoryError:
            if config["volumes_per_step"] == 1:
                raise
            config["volumes_per_step"] //= 2
            torch.cuda.empty_cache()


def pretrain_child(config_path: Path, deadline: float) -> None:
    """In its own process (killed at the hard deadline): calibrate, size the run, train until done or `deadline`."""
    import yaml

    from FSEFTSegmentLib.errors import Cancelled
    from FSEFTSegmentLib.pretraining.config import PretrainConfig
    from FSEFTSegmentLib.pretraining.loop import pretrain
    from FSEFTSegmentLib.progress import JsonProgress

    values = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    calibration = calibrate(values)
    volumes = sum(spec.volumes for spec in PretrainConfig.from_yaml(config_path).datasets)
    synthesis = volumes * 3.5 / values["synthesis_workers"]  # 0.8-6.4 s a volume on one core, measured here
    training = (deadline - time.time()) - synthesis - 30  # the validations, the last checkpoint
    dry_run = values["steps_per_epoch"] == DRY_STEPS_PER_EPOCH
    steps = 3 if dry_run else max(100, int(0.8 * training / calibration["step_seconds"]))
    values.update(steps=steps, validate_every=steps if dry_run else steps // 4)
    config_path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    plan = {"calibration": calibration, "planned_steps": steps, "volumes": volumes, "synthesis_estimate_s": round(synthesis)}
    (config_path.parent / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    print(json.dumps(plan), flush=True)
    config = PretrainConfig.from_yaml(config_path)
    try:
        pretrain(config, JsonProgress(), should_stop=lambda: time.time() > deadline)
    except Cancelled as stopped:
        print(f"stopped at the deadline: {stopped}", flush=True)


def pretraining(run: Run, data: Path, dry_run: bool) -> dict:
    import yaml

    out = SCRATCH / "pretraining"
    config_path = SCRATCH / "fseft-mini-gpu.yaml"
    config_path.write_text(yaml.safe_dump(pretraining_config(dry_run, data, out), sort_keys=False), encoding="utf-8")
    soft = time.time() + run.left() - 25  # time to export and split after the last step
    outcome = run.bounded([sys.executable, __file__, "pretrain-child", str(config_path), str(soft)], run.left() - 10)
    record: dict = {"status": "passed" if outcome["returncode"] == 0 else "failed", **outcome,
                    "config": yaml.safe_load(config_path.read_text(encoding="utf-8"))}
    for name in ("validation.jsonl", "loss.jsonl"):
        if (out / name).is_file():
            shutil.copy2(out / name, run.out / name)
    if (SCRATCH / "plan.json").is_file():
        record["plan"] = json.loads((SCRATCH / "plan.json").read_text(encoding="utf-8"))
    record.update(summarise_pretraining(out))
    # checkpoint-best.pt exists only if training beat the shipped weights; else the last weights
    # come back all the same (the transfer is checked), marked as not to ship
    checkpoint = next((path for path in (out / "checkpoint-best.pt", out / "checkpoint-last.pt") if path.is_file()), None)
    if checkpoint is not None:
        from FSEFTSegmentLib.io.files import sha256_file
        from FSEFTSegmentLib.pretraining.config import PretrainConfig
        from FSEFTSegmentLib.pretraining.loop import export_model

        exported = SCRATCH / "fseft-mini-candidate.safetensors"
        export_model(PretrainConfig.from_yaml(config_path), exported, checkpoint)
        record["candidate"] = {"checkpoint": checkpoint.name, "beat_shipped": checkpoint.name == "checkpoint-best.pt",
                               "sha256": sha256_file(exported), "content_sha256": weights_digest(exported),
                               "bytes": exported.stat().st_size, "parts": split_weights(exported, run.out)}
    return record


def summarise_pretraining(out: Path) -> dict:
    """Steps run, their median seconds, the shipped weights' validation mean (step 0) and the best after."""
    import statistics

    def records(name):
        path = out / name
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        return [json.loads(line) for line in lines if line.strip()]

    losses, validations = records("loss.jsonl"), records("validation.jsonl")
    shipped = next((r for r in validations if r["step"] == 0), None)
    trained = [r for r in validations if r["step"] > 0]
    best = max(trained, key=lambda r: r["mean"], default=None)
    return {
        "steps_run": len(losses),
        "median_step_seconds": round(statistics.median(r["seconds"] for r in losses), 4) if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "shipped_validation_mean": shipped and shipped["mean"],
        "best_validation_mean": best and best["mean"],
        "best_step": best and best["step"],
        "improved": bool(shipped and best and best["mean"] > shipped["mean"]),
    }


def split_weights(path: Path, folder: Path) -> list[str]:
    """Tensors of `path` in parts of at most 15 MiB (the device tool returns files of 16 MiB at most),
    each with the file's metadata, so `merge_weights` rebuilds the same tensors and metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as weights:
        metadata = weights.metadata()
        parts, current, size = [], {}, 0
        for key in weights.keys():
            tensor = weights.get_tensor(key)
            if current and size + tensor.nbytes > PART_LIMIT:
                parts.append(current)
                current, size = {}, 0
            current[key], size = tensor, size + tensor.nbytes
        parts.append(current)
    names = []
    for number, tensors in enumerate(parts, 1):
        name = f"candidate.part{number}.safetensors"
        save_file(tensors, str(folder / name), metadata=metadata)
        names.append(name)
    return names


def run_all(out: Path, dry_run: bool, data: Path) -> None:
    import torch

    run = Run(out, dry_run)
    if SCRATCH.exists():
        shutil.rmtree(SCRATCH)
    SCRATCH.mkdir(parents=True)
    run.results["environment"] = environment_record()
    run.save()
    cuda = torch.cuda.is_available()
    if not cuda and not dry_run:
        sys.exit("PyTorch sees no CUDA GPU here: use --dry-run on a CPU")
    run.step("cuda-tests", cuda_tests)
    run.step("timings", timings, "cuda" if cuda else "cpu", dry_run)
    run.step("pretraining", pretraining, data, dry_run)
    run.results["seconds"] = round(time.monotonic() - run.started, 1)
    run.save()
    print_summary(run.results)


def print_summary(results: dict) -> None:
    """The short table the device tool's reply ends with."""
    steps = results["steps"]
    gpus = results.get("environment", {}).get("gpus") or [{"name": "no GPU (dry run)"}]
    print(f"\n{gpus[0]['name']}, torch {results.get('environment', {}).get('torch')}, {results.get('seconds')} s")
    tests = steps.get("cuda-tests", {})
    print(f"cuda-tests: {tests.get('status')}; " + ", ".join(f"{name} {t['outcome']}" for name, t in tests.get("tests", {}).items()))
    for name in ("predict", "adapt"):
        for row in (steps.get("timings", {}).get(name) or {}).get("results") or []:
            cells = {key: row[key] for key in ("seconds", "step_seconds", "peak_gpu_mb", "peak_rss_mb", "speedup_vs_baseline",
                                                 "step_ratio_vs_sa_recompute", "gpu_memory_ratio_vs_sa_recompute",
                                                 "mask_dice_vs_baseline") if key in row}
            print(f"{name} {row['variant']}: {cells}")
    training = steps.get("pretraining", {})
    keys = ("status", "steps_run", "median_step_seconds", "shipped_validation_mean", "best_validation_mean", "best_step", "improved")
    print("pretraining: " + ", ".join(f"{key} {training.get(key)}" for key in keys))


# -------------------------------------------------------------------------------- collect (here)


def collect(folder: Path) -> None:
    """The reply's files into benchmarks/results/ and, when training beat the shipped weights, the
    candidate weights rebuilt (and checked against their sha256) under build/device/."""
    results = json.loads((folder / RESULTS).read_text(encoding="utf-8"))
    stem = "device-dry-run" if results["dry_run"] else "device"
    target = ROOT / "benchmarks" / "results"
    (target / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if (folder / "validation.jsonl").is_file():
        shutil.copy2(folder / "validation.jsonl", target / f"{stem}-validation.jsonl")
    print(f"results: {target / (stem + '.json')}")
    print_summary(results)
    candidate = results["steps"].get("pretraining", {}).get("candidate")
    if candidate:
        weights = ROOT / "build" / "device" / "fseft-mini-candidate.safetensors"
        merge_weights([folder / name for name in candidate["parts"]], weights, candidate["content_sha256"])
        if not candidate["beat_shipped"]:
            print(f"\nweights rebuilt in {weights} ({candidate['checkpoint']}): they did NOT beat the shipped ones "
                  f"on the synthetic validation; do not ship them")
            return
        print(f"\ncandidate weights (beat the shipped ones on the synthetic validation): {weights}\n"
              f"next: .venv/bin/python benchmarks/model_card.py --model {weights} --json build/device/model_card.json,\n"
              f"then ship only as Resources/models/fseft-mini/MODEL_CARD.md says (DEVELOPERS.md)")


def weights_digest(path: Path) -> str:
    """sha256 of a safetensors file's metadata and tensors, in sorted order: the same weights give the
    same digest whatever order a writer put them in (safetensors keeps no metadata order)."""
    import hashlib

    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as weights:
        digest.update(json.dumps(weights.metadata(), sort_keys=True).encode())
        for key in sorted(weights.keys()):
            tensor = weights.get_tensor(key)
            digest.update(f"{key} {tensor.dtype} {list(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def merge_weights(parts: list[Path], target: Path, content_sha256: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, metadata = {}, None
    for part in parts:
        with safe_open(str(part), "pt") as weights:
            metadata = metadata or weights.metadata()
            tensors.update({key: weights.get_tensor(key) for key in weights.keys()})
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)
    if weights_digest(target) != content_sha256:
        target.unlink()
        sys.exit(f"{parts[0].parent}: the parts do not rebuild the exported weights (their content digest differs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pack", help="here: fill .device/ (wheels, SimpleITK, data) and check the travelling size")
    run = commands.add_parser("run", help="on the GPU machine (or --dry-run on a CPU): the three steps")
    run.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "build" / "device-run"))
    run.add_argument("--dry-run", action="store_true", help="tiny step counts on the CPU; the CUDA tests are skipped")
    take = commands.add_parser("collect", help="here: the device reply's files into benchmarks/results/")
    take.add_argument("folder", type=Path)
    child = commands.add_parser("pretrain-child", help=argparse.SUPPRESS)
    child.add_argument("config", type=Path)
    child.add_argument("deadline", type=float)
    args = parser.parse_args()
    if args.command == "pack":
        pack()
    elif args.command == "collect":
        collect(args.folder)
    else:
        bootstrap(sys.argv)
        sys.path.insert(0, str(ROOT))
        if args.command == "pretrain-child":
            pretrain_child(args.config, args.deadline)
            return
        local = ROOT.parent / "shared" / "data"
        data = local if local.is_dir() else PACK / "data"
        os.environ["FSEFT_SHARED_DATA"] = str(data)  # benchmarks/predict.py and adapt.py read it
        run_all(args.out.resolve(), args.dry_run, data)


if __name__ == "__main__":
    main()
