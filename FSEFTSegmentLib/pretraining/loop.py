"""Pretraining of the foundation network on several partially labelled CT datasets (paper-facts section 5).

A YAML config (`config.PretrainConfig`) names the datasets (images, label maps, how each label value
maps to a universal id, which universal ids the dataset annotates), the architecture and the
schedule. One step: every process draws `volumes_per_step` volumes, each by picking a dataset
uniformly and then one of its volumes uniformly (sampling balanced over datasets), and cuts
`crops_per_volume` crops from each (centred on foreground or background, `positive_fraction`
positive, as MONAI's RandCropByPosNegLabel; axial rot90 and intensity-shift augmentation); the loss is the partial-label soft
Dice (`loss.partial_label_dice_loss`); AdamW (weight decay 1e-5); the learning rate warms up
linearly from lr * `warmup_start_factor` over `warmup_epochs` epochs, then follows a cosine to 0,
both stepped per step. With `hold_lr_until_dice: D` (and validation, below) the learning rate stays
at its peak until a validation where every class reaches Dice D, and only then decays: a cosine that
anneals while small organs are still at zero freezes them there. An epoch is `steps_per_epoch` steps
(default: enough steps for every process together to draw as many volumes as there are).

Volumes (`volume_cache`) are preprocessed once (CTPreprocessing; the remapped label map follows with
`masks_to_model_space`) when first drawn, and kept in RAM as a float32 image and a uint8 map of
universal ids; with `volume_cache: true` also on disk under `out/volume-cache/`, so a resumed run
does not synthesise them again. With `synthesis_workers: N` N worker processes prepare every volume
in the background from the start (validation volumes first) while the training process steps: a
fast accelerator no longer waits on one core's synthesis (a step waits only for a volume it draws
that is not ready yet). The volumes are the same as prepared in the training process.

Randomness is drawn from generators seeded by (seed, step, rank), so a run resumed from a checkpoint
draws exactly what the uninterrupted run would have (resumed with another total number of steps,
the cosine continues from the checkpoint's step toward the new end); the checkpoint (`checkpoint-last.pt`,
written atomically every `checkpoint_every` steps, when stopped and at the end) holds the model,
optimizer and scheduler states, the step, the torch RNG state and the architecture, all loadable
with `torch.load(weights_only=True)`. The final weights alone go to `model.pt` (a plain state dict,
loadable by `model.checkpoint.build_from_checkpoint`). Each step appends one JSON line to `loss.jsonl`.
With `validate_every` (and a dataset's `validation: N`) the run scores its validation volumes every
so many steps (`validation.py`): per-class Dice to `validation.jsonl`, the best weights so far to
`checkpoint-best.pt`. A new run from `init:` weights first scores them (step 0), so `checkpoint-best.pt`
exists only if training beat its starting point. `precision: bf16` runs the forward pass under bfloat16 autocast; `auto` does so
only where the hardware computes bf16 natively (`pretraining_dtype`).

Launched under torchrun (RANK / WORLD_SIZE set, more than one process) the model is wrapped in
DistributedDataParallel (gloo on the CPU, nccl on CUDA); only rank 0 writes files:

    torchrun --nproc_per_node 4 -m FSEFTSegmentLib.pretraining.loop config.yaml
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import Cancelled, FSEFTError, InputError
from ..inference import native_bf16_cpu
from ..model.checkpoint import ARCHITECTURE_METADATA, build_from_checkpoint, stored_metadata
from ..model.network import Architecture, FoundationSwinUNETR
from ..progress import Progress, make_progress
from ..training import _cut
from .config import NO_VALIDATION_VOLUMES, PretrainConfig
from .loss import partial_label_dice_loss
from .validation import summary, validate
from .volume_cache import _atomic_save, _VolumeCache

CHECKPOINT_NAME = "checkpoint-last.pt"
BEST_NAME = "checkpoint-best.pt"  # the weights with the best mean validation Dice so far
VALIDATION_LOG_NAME = "validation.jsonl"
MODEL_NAME = "model.pt"
LOG_NAME = "loss.jsonl"
VOLUME_CACHE_NAME = "volume-cache"
NONFINITE_BATCH_NAME = "nonfinite-batch.pt"  # the first batch whose gradients were not finite
MAX_NONFINITE_STEPS = 5  # skipped steps in a row before the run stops


# ------------------------------------------------------------------------------------------ schedule


def lr_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float = 0.1, decay_from: int | None = None) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warm-up from `start_factor`, 1 until
    `decay_from` (default: the end of the warm-up), then a cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    start = warmup_steps if decay_from is None else max(decay_from, warmup_steps)
    if step < start:
        return 1.0
    span = max(total_steps - start, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - start, span) / span))


def _step_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 7 + stream)


# -------------------------------------------------------------------------------------------- data


#: the axial (X, Y) plane of a (C, X, Y, Z) crop in RAS
AXIAL_PLANE = (1, 2)


def random_axial_rot90(image: torch.Tensor, target: torch.Tensor, probability: float, generator: torch.Generator):
    """With `probability`, both crops turned by the same 1-3 quarter turns in the axial plane only, as
    the official code (MONAI's RandRotate90 with spatial_axes=(0, 1)): the head-feet axis never moves.
    Drawn from `generator` rather than MONAI's own random state, so a resumed run draws the same."""
    if float(torch.rand((), generator=generator)) >= probability:
        return image, target
    turns = int(torch.randint(1, 4, (1,), generator=generator))
    return torch.rot90(image, turns, AXIAL_PLANE), torch.rot90(target, turns, AXIAL_PLANE)


def _draw_batch(config: PretrainConfig, cache: _VolumeCache, crop: int, step: int, rank: int):
    """This process's batch of `step`: images (B, 1, s, s, s), targets (B, C, s, s, s), annotated (B, C)."""
    draw = _step_generator(config.seed, step, rank, 0)
    augment = _step_generator(config.seed, step, rank, 1)
    channels = config.architecture.out_channels
    ids = torch.arange(1, channels + 1, dtype=torch.uint8).view(-1, 1, 1, 1)
    weights = torch.tensor([spec.weight for spec in config.datasets], dtype=torch.float64)
    images, targets, annotated, names = [], [], [], []
    for _ in range(config.volumes_per_step):
        dataset = int(torch.multinomial(weights, 1, generator=draw))
        spec = config.datasets[dataset]
        index = int(torch.randint(spec.volumes, (1,), generator=draw))
        volume = cache.get(dataset, index)
        mask = torch.zeros(channels, dtype=torch.bool)
        mask[[v - 1 for v in spec.annotated]] = True
        names.append(spec.name)
        for start in volume.sampler.sample(crop, config.crops_per_volume, config.positive_fraction, draw):
            image = _cut(volume.image, start, crop)
            target = _cut(volume.label, start, crop) == ids  # (C, s, s, s)
            image, target = random_axial_rot90(image, target, config.rot90_prob, augment)
            if float(torch.rand((), generator=augment)) < config.intensity_shift_prob:
                image = image + (2 * float(torch.rand((), generator=augment)) - 1) * config.intensity_shift
            images.append(image)
            targets.append(target)
            annotated.append(mask)
    return torch.stack(images), torch.stack(targets).float(), torch.stack(annotated), names


# ---------------------------------------------------------------------------------------- training


def pretraining_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The forward pass's autocast dtype (None: float32) for a config's `precision` on `device`."""
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else native_bf16_cpu()
    if precision == "bf16" or (precision == "auto" and native):
        return torch.bfloat16
    return None

def _load_init(network: FoundationSwinUNETR, path: str, progress: Progress) -> None:
    from ..model.checkpoint import read_tensors

    tensors = read_tensors(path)
    own = network.state_dict()
    matching = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise InputError("no tensor of the initial weights fits the network", path)
    network.load_state_dict(matching, strict=False)
    progress.info(f"initialised {len(matching)} of {len(own)} tensors from {path}")


def pretrain(config: PretrainConfig, progress: Progress, should_stop: Callable[[], bool] | None = None) -> dict:
    """Run (or resume) pretraining; returns {steps, last_loss, out, checkpoint, model}.

    `should_stop()` is polled (on rank 0) before every step; when it answers true a checkpoint is
    written and `Cancelled` is raised; running again with `resume` continues the same schedule.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    initialised_here = False
    if distributed and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        initialised_here = True
    rank = dist.get_rank() if distributed else 0
    try:
        return _pretrain(config, progress if rank == 0 else Progress(), should_stop, rank, world, distributed)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def _pretrain(config, progress, should_stop, rank, world, distributed) -> dict:
    started = time.monotonic()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    crop = config.crop
    volumes = sum(spec.volumes for spec in config.datasets)
    per_epoch = config.steps_per_epoch or max(1, volumes // (config.volumes_per_step * world))
    total = config.steps or config.epochs * per_epoch
    warmup = round(config.warmup_epochs * per_epoch)
    out = Path(config.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    network = FoundationSwinUNETR(config.architecture)
    if config.init:
        _load_init(network, config.init, progress)
    network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    decay_start: int | None = None  # with hold_lr_until_dice: the step whose validation ended the hold

    def factor(at: int) -> float:
        decay_from = (total if decay_start is None else decay_start) if config.hold_lr_until_dice else None
        return lr_factor(at, warmup, total, config.warmup_start_factor, decay_from)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    step = 0
    checkpoint_path = out / CHECKPOINT_NAME
    if config.resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        decay_start = state.get("decay_start")
        progress.info(f"resuming from step {step} of {total} ({checkpoint_path})")
        # The lr follows this config's schedule from here: a run resized on resume continues its
        # cosine from this step toward the new end (a warm restart when extended), and a hold
        # switched on or off takes effect, without starting over.
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * factor(step)
        if state.get("total_steps") != total:
            progress.info(f"the schedule changes from {state.get('total_steps')} to {total} steps at step {step}")
    model = network
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    log_path, validation_path = out / LOG_NAME, out / VALIDATION_LOG_NAME
    if rank == 0:
        _trim_log(log_path, step)
        _trim_log(validation_path, step)
    best = max((record["mean"] for record in _read_log(validation_path)), default=-1.0)

    def weights() -> dict:
        """What `load_run_checkpoint` needs: enough to export or validate, not to resume."""
        return {"model": network.state_dict(), "step": step, "total_steps": total, "architecture": config.architecture.to_dict()}

    def save_checkpoint() -> None:
        if rank != 0:
            return
        _atomic_save(
            {**weights(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "seed": config.seed,
             "torch_rng": torch.get_rng_state(), "decay_start": decay_start},
            checkpoint_path,
        )

    progress.emit(
        "start", steps=total, message=f"pretraining {total} steps ({per_epoch} a epoch, warm-up {warmup}) "
        f"on {len(config.datasets)} dataset(s), {volumes} volume(s), {world} process(es), {device.type}"
    )
    dtype = pretraining_dtype(config.precision, device)
    if dtype is not None and device.type == "cpu" and not native_bf16_cpu():
        progress.warning("precision bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): steps run about 30x "
                         "slower than in float32 here; use precision: auto or fp32")
    cache = _VolumeCache(config, crop, out / VOLUME_CACHE_NAME if config.volume_cache else None)

    def scored(at: int, label: str, **extra) -> dict:
        """Validate the network now, log it to validation.jsonl and the progress stream."""
        result = validate(network, config, cache, device)
        with open(validation_path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": at, **extra, **result}) + "\n")
        progress.info(f"{label}: {summary(result)}")
        return result

    if config.synthesis_workers:
        cache.prepare_in_background(config.synthesis_workers)
        progress.info(f"{config.synthesis_workers} worker process(es) prepare the volumes in the background")
    try:
        if rank == 0 and config.init and config.validate_every and step == 0 and not _read_log(validation_path):
            # the starting weights' score: checkpoint-best.pt then appears only if training beats them
            best = scored(0, "initial weights", init=config.init)["mean"]
        model.train()
        last_loss = float("nan")
        nonfinite_in_a_row = 0
        while step < total:
            stop = bool(should_stop()) if (should_stop is not None and rank == 0) else False
            if distributed:
                flag = torch.tensor([1.0 if stop else 0.0], device=device)
                dist.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop:
                save_checkpoint()
                raise Cancelled(f"pretraining stopped at step {step} of {total}; the checkpoint {checkpoint_path} resumes it")
            step_started = time.monotonic()
            images, targets, annotated, names = _draw_batch(config, cache, crop, step, rank)
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = model(images.to(device))
            loss = partial_label_dice_loss(logits.float(), targets.to(device), annotated.to(device),
                                           bce_weight=config.bce_weight, absent_class_dice=config.absent_class_dice)
            loss.backward()
            # One non-finite gradient would make every weight NaN for good (seen once in a CPU run, cause
            # not found): that step is skipped, its batch kept for a look, and several in a row stop the run.
            # Under DDP the gradients are all-reduced, so every process takes the same decision.
            gradients = [p.grad for p in network.parameters() if p.grad is not None]
            finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(gradients)))
            if finite:
                optimizer.step()
                nonfinite_in_a_row = 0
            else:
                nonfinite_in_a_row += 1
                progress.warning(f"step {step + 1}: non-finite gradients; the step is skipped (no update)")
                if rank == 0 and not (out / NONFINITE_BATCH_NAME).exists():
                    _atomic_save({"step": step + 1, "images": images, "targets": targets, "annotated": annotated,
                                  "datasets": names}, out / NONFINITE_BATCH_NAME)
                if nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
                    save_checkpoint()
                    raise FSEFTError(f"{MAX_NONFINITE_STEPS} steps in a row had non-finite gradients (from step "
                                     f"{step + 2 - MAX_NONFINITE_STEPS}); the first such batch is in {out / NONFINITE_BATCH_NAME}")
            with warnings.catch_warnings():  # a skipped first step: the schedule moves on all the same, on purpose
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
                scheduler.step()
            step += 1
            reported = loss.detach()
            if distributed:
                dist.all_reduce(reported)
                reported = reported / world
            last_loss = float(reported)
            if rank == 0:
                with open(log_path, "a", encoding="utf-8") as log:
                    record = {"step": step, "epoch": (step - 1) // per_epoch + 1, "loss": round(last_loss, 6), "lr": lr_now,
                              "datasets": names, "seconds": round(time.monotonic() - step_started, 3), **({} if finite else {"skipped": True})}
                    log.write(json.dumps(record) + "\n")
            progress.step(step / total, f"step {step}/{total}: loss {last_loss:.4f}, lr {lr_now:.2e}")
            if step % config.checkpoint_every == 0 and step < total:
                save_checkpoint()
            if config.validate_every and (step % config.validate_every == 0 or step == total):
                if rank == 0:
                    result = scored(step, f"step {step}")
                    if result["mean"] > best:
                        best = result["mean"]
                        _atomic_save({**weights(), "validation": result}, out / BEST_NAME)
                    if config.hold_lr_until_dice and decay_start is None and step < total and _all_reach(result, config.hold_lr_until_dice):
                        decay_start = step  # the cosine starts at its peak: no jump in the lr
                        progress.info(f"step {step}: every class reached Dice {config.hold_lr_until_dice}: "
                                      f"the learning rate now decays (cosine to step {total})")
                if distributed:  # every process follows rank 0's decision (and waits for its validation)
                    shared = torch.tensor([-1 if decay_start is None else decay_start], device=device)
                    dist.broadcast(shared, 0)
                    decay_start = None if int(shared) < 0 else int(shared)
        save_checkpoint()
        if rank == 0:
            _atomic_save(network.state_dict(), out / MODEL_NAME)
        if distributed:
            dist.barrier()
        progress.info(f"pretraining done: {total} steps, last loss {last_loss:.4f}, {time.monotonic() - started:.0f} s; weights in {out / MODEL_NAME}")
        if config.hold_lr_until_dice and decay_start is None:
            progress.info(f"the learning rate never decayed: some class stayed below Dice {config.hold_lr_until_dice} "
                          f"(validation.jsonl); lengthen `epochs` to continue")
        return {"steps": step, "last_loss": last_loss, "out": str(out), "checkpoint": str(checkpoint_path), "model": str(out / MODEL_NAME)}
    finally:
        cache.close()


def _all_reach(result: dict, dice: float) -> bool:
    return bool(result["dice"]) and min(result["dice"].values()) >= dice


def _read_log(path: Path) -> list[dict]:
    """The records of a JSON-lines log (a torn last line, from a killed run, is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the last checkpoint by a stopped run)."""
    if not path.is_file():
        return
    kept = [json.dumps(record) for record in _read_log(path) if record["step"] <= step]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)


def load_run_checkpoint(config: PretrainConfig, checkpoint: str | os.PathLike | None = None) -> dict:
    """A checkpoint of the run (default: its latest), pickle-free; clear errors for a missing or foreign file."""
    path = Path(checkpoint) if checkpoint else Path(config.out) / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError("no such checkpoint" if checkpoint else "no checkpoint yet; run the pretraining first", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"not a readable checkpoint ({type(error).__name__})", path) from None
    if not isinstance(state, dict) or not {"model", "step", "total_steps", "architecture"} <= set(state):
        raise InputError("not a pretraining checkpoint (it needs model, step, total_steps, architecture)", path)
    return state


def validate_checkpoint(config: PretrainConfig, checkpoint: str | os.PathLike | None = None) -> dict:
    """The per-class validation Dice of a checkpoint (default: the run's latest) or of exported
    weights (`.safetensors`, e.g. a shipped model, to compare it with a new run), with its step."""
    if not any(spec.validation for spec in config.datasets):
        raise InputError(NO_VALIDATION_VOLUMES, config.source)
    if checkpoint and Path(checkpoint).suffix == ".safetensors":
        network = build_from_checkpoint(checkpoint, config.architecture)
        step = _exported_step(checkpoint)
    else:
        state = load_run_checkpoint(config, checkpoint)
        network = FoundationSwinUNETR(Architecture.from_dict(state["architecture"]))
        network.load_state_dict(state["model"])
        step = int(state["step"])
    if network.architecture != config.architecture:
        raise InputError("the weights' architecture differs from the config's", checkpoint or config.source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = _VolumeCache(config, config.crop, Path(config.out) / VOLUME_CACHE_NAME if config.volume_cache else None)
    return {"step": step, **validate(network.to(device), config, cache, device)}


def _exported_step(path: str | os.PathLike) -> int | None:
    """The step `export_model` recorded in a safetensors file ("3201 of 3400"), if any."""
    steps = stored_metadata(path).get("fseft.steps", "")
    return int(steps.split()[0]) if steps[:1].isdigit() else None


def _steps_in_all(path: str | os.PathLike) -> int | None:
    """Every pretraining step behind exported weights: the run's own plus those of its `init` weights."""
    if Path(path).suffix != ".safetensors":
        return None
    step = _exported_step(path)
    return None if step is None else step + int(stored_metadata(path).get("fseft.steps_before", "0"))


def export_model(config: PretrainConfig, target: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> dict:
    """Write a checkpoint's weights (default: the run's latest) as a shippable safetensors file:
    tensors plus metadata (the architecture with the universal class names, the step reached, the
    config, the validation Dice when the checkpoint has one). Atomic."""
    from safetensors.torch import save_file

    from ..io.files import atomic_write
    from ..labels import UNIVERSAL_STRUCTURES

    state = load_run_checkpoint(config, checkpoint)
    architecture = Architecture.from_dict(state["architecture"])
    names = tuple(structure.name for structure in UNIVERSAL_STRUCTURES[: architecture.out_channels])
    architecture = Architecture.from_dict({**architecture.to_dict(), "class_names": names})
    # Weights as float32; the relative-position index buffers (int64, a third of the bytes) as int16,
    # which holds them exactly and loads back into the int64 buffers.
    tensors = {
        key: (value.to(torch.int16) if key.endswith("relative_position_index") else value.float()).contiguous()
        for key, value in state["model"].items()
    }
    metadata = {
        ARCHITECTURE_METADATA: json.dumps(architecture.to_dict()),
        "fseft.steps": f"{state['step']} of {state['total_steps']}",
        "fseft.config": Path(config.source).name if config.source else "",
        "fseft.training_data": "synthetic images only" if all(spec.synthesize for spec in config.datasets) else "see config",
    }
    before = _steps_in_all(config.init) if config.init else None
    if before:  # a run continued from exported weights (`init`): the steps that made them
        metadata["fseft.steps_before"] = str(before)
    if "validation" in state:
        metadata["fseft.validation_dice"] = json.dumps(state["validation"]["dice"])
    with atomic_write(target) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return {"path": str(target), "steps": int(state["step"]), "total_steps": int(state["total_steps"])}


def pretrain_until_signalled(config: PretrainConfig, progress: Progress) -> dict:
    """`pretrain` for a terminal or a scheduler: Ctrl-C or SIGTERM (as torchrun and batch schedulers
    send) finishes the current step and checkpoints it (`Cancelled`), so no step is lost; a second
    signal stops at once."""
    stop_requested = threading.Event()

    def request_stop(signum, frame):
        if stop_requested.is_set():
            raise KeyboardInterrupt
        stop_requested.set()
        print("stopping after this step and writing a checkpoint (again to stop at once)", file=sys.stderr, flush=True)

    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {number: signal.signal(number, request_stop) for number in handled}
    try:
        return pretrain(config, progress, should_stop=stop_requested.is_set)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main_pretrain(config_path: str, progress_kind: str = "bar") -> int:
    """The torchrun entry point: run or resume pretraining; returns the exit code."""
    try:
        pretrain_until_signalled(PretrainConfig.from_yaml(config_path), make_progress(progress_kind))
    except FSEFTError as error:
        print(str(error), file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:
        print("pretraining interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr, flush=True)
        return Cancelled.exit_code
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node N -m FSEFTSegmentLib.pretraining.loop config.yaml
    if len(sys.argv) != 2:
        print("usage: python -m FSEFTSegmentLib.pretraining.loop CONFIG.yaml", file=sys.stderr)
        sys.exit(2)
    sys.exit(main_pretrain(sys.argv[1], os.environ.get("FSEFT_PROGRESS", "bar")))
