"""Few-shot adaptation with the paper's recipe, and a cache of frozen features for black-box methods.

Recipe (paper-facts section 6, the 2025 code): one step = one support volume and `crops_per_step`
random crops of the patch size (centres on foreground or background 1:1, image and label padded to
at least one patch first), soft Dice loss (sigmoid, smooth 1) per crop and structure, averaged;
AdamW without weight decay over the trainable parameters only; one warm-up epoch, then cosine
decay stepped per epoch, for at most 200 epochs; one epoch = K steps over the K supports in a
seeded random order; early stopping on the 10-epoch moving average of the training loss
(`plateaued`). The frozen part of the backbone runs in eval mode.

Feature cache (`feature_cache.FeatureCache`). A black-box method (linear probe, spatial and 1x1
adapters) trains only modules that read the frozen `decoder1` features, so those are computed once
per support, over the whole volume with the same Gaussian-blended sliding window prediction uses
(so the head trains on what it will see at inference), stored as fp16 (in a deleted-on-close
temporary file when larger than `cache_spill_bytes`), and each step's crops are cut from them: a
step costs the head's forward and backward alone. Differences to the paper's recipe: the intensity-shift augmentation acted on the
image before the backbone and cannot act on cached features, so cached training has none; a crop's
features carry the context of the whole volume rather than of the crop alone (as at inference).
With `precision="auto"` a cached head step runs under bf16 autocast, channels-last, where the CPU
computes bf16 natively (AVX512-BF16/AMX) and on CUDA: several times faster for the spatial adapter,
with training losses within 1e-4 of fp32 (benchmarks/adapt.py); the backbone itself follows
prediction's precision rule (fp32 on the CPU).

Transductive size prior (paper-facts section 9). With unlabeled query volumes, the mean support
size S of each structure (largest component, trimmed for K >= 5: `priors`) bounds the query's
predicted size (sum of its probabilities): once per epoch from `size_prior_start` on, the loss gains
lambda * hinge outside [(1 - gamma) S, (1 + gamma) S] per structure (the paper's objective
sum_k L_seg + lambda L_TI, one TI term per pass over the supports; `size_prior_separate_step` gives
it a step of its own, as the 2023 code). The paper adapts once per query (`adapt_per_query`, the
default `size_prior_mode`); the `joint` mode adapts once for several queries and averages their
terms. Query features are cached too, average-pooled x2 as the paper's code, and each pooled voxel
counts for the voxels it covers, so the predicted size stays in full-resolution voxels.

Multi-class softmax head (`AdaptedModel(softmax=True)`): softmax Dice over every channel with the
background first, as the paper's FLARE'22 setting; supports' structures must not overlap.

Training writes no files; the caller saves the adapter. `should_stop()` is polled before every
step (and every crop pass) and between sliding windows; when it answers true, `Cancelled` is raised
and every cache this call made is released (spilled caches live in already-unlinked temporary
files). A KeyboardInterrupt (SIGINT, or SIGTERM as the CLI maps it) propagates the same way.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.optimizers import WarmupCosineSchedule

from .errors import Cancelled, InputError
from .feature_cache import FeatureCache
from .inference import native_bf16_cpu, window_count
from .methods.adapted import AdaptedModel
from .model.network import FoundationSwinUNETR, crop_size_problem
from .progress import Progress

#: share of the progress bar given to feature caching when it runs
CACHE_PROGRESS_SHARE = 0.2
SIZE_PRIOR_MODES = ("per-query", "joint")


@dataclass
class TrainingCase:
    """One support (with its label) or query (label None), already in model space."""

    id: str
    volume: torch.Tensor  # (1, X, Y, Z) preprocessed image (a MetaTensor from CTPreprocessing)
    label: torch.Tensor | None = None  # (S, X, Y, Z) uint8, one channel per target structure
    #: optional precomputed frozen features of this support (`cache_features`), to train several
    #: black-box heads on the same supports and network without recomputing them; left open
    features: FeatureCache | None = None


@dataclass
class TrainingSettings:
    max_epochs: int | None = None  # None: the method's own (the 2023 workshop methods: 100), else 200
    crops_per_step: int = 6
    positive_fraction: float = 0.5  # the paper's pos:neg = 1:1
    crop_size: int | None = None  # None: the architecture's patch size
    learning_rate: float | None = None  # None: the method's (its decoder-tuned rate with --tune-decoder)
    weight_decay: float | None = None  # AdamW's; None: the method's (0 as the paper's 2025 code; 1e-5 for the 2023 methods)
    warmup_epochs: int = 1
    #: the warm-up starts at lr * this; None = 1 / warmup_epochs, as the paper's code
    #: (`warmup_start_lr = lr / warmup_epoch`, which for its single warm-up epoch is lr itself)
    warmup_start_factor: float | None = None
    intensity_shift: float = 0.1  # MONAI RandShiftIntensity offsets, per crop, before the backbone
    intensity_shift_prob: float = 0.2  # the paper's code (RandShiftIntensityd(offsets=0.1, prob=0.2))
    early_stop: bool = True
    early_stop_after: int = 31
    early_stop_patience: int = 20
    early_stop_average: int = 10
    early_stop_min_delta: float = 1e-3
    seed: int = 0
    feature_cache: bool | None = None  # None: cache whenever the backbone is frozen
    cache_spill_bytes: int = 2 * 1024**3  # larger feature volumes go to a temporary file
    cache_dir: str | None = None  # where spilled caches live (None: the system's temporary folder)
    #: crops per forward/backward pass (gradients accumulate: same result, less memory);
    #: None = all crops at once, except one at a time when gradients flow through the backbone
    crops_per_pass: int | None = None
    size_prior: bool = False
    size_prior_gamma: float = 0.3
    size_prior_weight: float = 0.1
    size_prior_start: int | None = None  # first epoch (0-based) with the prior; None: max_epochs // 4
    #: per-query: one adaptation per query volume, as the paper's transductive episodes (`adapt_per_query`);
    #: joint: one adaptation for all the queries, their size-prior terms averaged
    size_prior_mode: str = "per-query"
    #: False: the term joins the gradient of each epoch's last support step (the paper's objective, one
    #: lambda L_TI per pass over the K supports); True: it takes an optimiser step of its own after it (2023 code)
    size_prior_separate_step: bool = False
    sw_batch_size: int | None = None  # windows per backbone pass (None: `inference.windows_per_batch`)
    overlap: float = 0.25
    #: auto | fp32 | bf16 | fp16. auto: like prediction for the backbone (fp32 on the CPU, bf16/fp16 on
    #: CUDA); the cached head step runs under bf16 autocast where the CPU has native bf16 (or on CUDA)
    precision: str = "auto"
    channels_last: bool | None = None  # None: channels-last 3D for cached head steps

    def adapts_per_query(self, queries: int) -> bool:
        """Whether `queries` query volumes mean one adaptation each (`adapt_per_query`), not one for all."""
        return self.size_prior and self.size_prior_mode == "per-query" and queries > 1


@dataclass
class TrainingResult:
    epochs: int
    stopped_early: bool
    curve: list[dict]  # per epoch: epoch (1-based), loss (mean Dice loss), lr, seconds [, size_prior_loss]
    seconds: float
    learning_rate: float = 0.0
    max_epochs: int = 0
    weight_decay: float = 0.0
    step_precision: str = "fp32"  # the dtype gradient steps ran in: fp32, bf16 or fp16
    feature_cache: bool = False
    size_prior: dict | None = None


# --------------------------------------------------------------------------------------------- rules


def plateaued(
    losses: Sequence[float], after: int = 31, patience: int = 20, average: int = 10, min_delta: float = 1e-3
) -> bool:
    """The paper's early-stopping rule on the per-epoch training losses (oldest first).

    Once `after` epochs are done, smooth the losses with an `average`-epoch moving average and stop
    when the latest smoothed value is not at least `min_delta` below the one `patience` entries back
    (19 epochs earlier with the defaults, as the paper's code compares `smooth[-20]` with `smooth[-1]`).
    """
    if len(losses) < max(after, average + patience - 1):
        return False
    smooth = np.convolve(np.asarray(losses, dtype=float), np.ones(average) / average, mode="valid")
    return bool(smooth[-patience] - smooth[-1] < min_delta)


def learning_rate_for(model: AdaptedModel, settings: TrainingSettings) -> float:
    if settings.learning_rate is not None:
        return float(settings.learning_rate)
    method = model.method
    return float(method.learning_rate_with_decoder if model.tune_decoder else method.learning_rate)


def trains_on_cache(model: AdaptedModel, settings: TrainingSettings) -> bool:
    """Whether the steps read cached frozen features: whenever the backbone is frozen, unless switched off."""
    return model.backbone_frozen if settings.feature_cache is None else bool(settings.feature_cache)


def epochs_for(model: AdaptedModel, settings: TrainingSettings) -> int:
    if settings.max_epochs is not None:
        return int(settings.max_epochs)
    return int(model.method.max_epochs or 200)


def weight_decay_for(model: AdaptedModel, settings: TrainingSettings) -> float:
    return float(model.method.weight_decay if settings.weight_decay is None else settings.weight_decay)


def step_autocast_dtype(device: torch.device, precision: str, cached: bool) -> torch.dtype | None:
    """Autocast dtype of a gradient step: `cached` steps run the head alone on cached features."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise InputError(f"unknown precision '{precision}'; choose auto, fp32, bf16 or fp16")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if cached and device.type == "cpu" and native_bf16_cpu() else None
    if precision == "fp16" and device.type != "cuda":
        raise InputError("fp16 training needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ------------------------------------------------------------------------------------------- crops


def pad_to(tensor: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad the last three dims to at least `size`, symmetrically (MONAI SpatialPad); returns the
    padded tensor and the offset of the original inside it."""
    before, pads = [], []
    for dim in tensor.shape[-3:]:
        diff = max(size - dim, 0)
        before.append(diff // 2)
        pads.append((diff // 2, diff - diff // 2))
    if not any(diff for pair in pads for diff in pair):
        return tensor, (0, 0, 0)
    flat = [value for pair in reversed(pads) for value in pair]  # F.pad: last dim first
    return F.pad(tensor, flat), tuple(before)


class CropSampler:
    """Crop starts centred on a random foreground voxel (of any structure) or a random background
    voxel, as MONAI's RandCropByPosNegLabel with `image_threshold=0` (background inside the body
    when there is any); each crop is positive with probability `positive_fraction`; centres are
    moved so the crop stays inside the volume."""

    def __init__(self, label: torch.Tensor, image: torch.Tensor | None = None):
        label = label if label.dim() == 4 else label[None]
        self.shape = tuple(int(n) for n in label.shape[-3:])
        foreground = (label != 0).any(0).reshape(-1)
        self.foreground = torch.nonzero(foreground).flatten()
        background = ~foreground
        if image is not None:
            inside = background & (image.reshape(-1) > 0)
            if bool(inside.any()):
                background = inside
        self.background = background
        self.background_count = int(background.sum())
        self._background_indices: torch.Tensor | None = None

    def _foreground_index(self, generator: torch.Generator) -> int:
        return int(self.foreground[torch.randint(len(self.foreground), (1,), generator=generator)])

    def _background_index(self, generator: torch.Generator) -> int:
        total = self.background.numel()
        if self.background_count >= total // 20:  # rejection sampling: cheap when background is common
            for _ in range(64):
                candidates = torch.randint(total, (64,), generator=generator)
                hits = candidates[self.background[candidates]]
                if hits.numel():
                    return int(hits[0])
        if self._background_indices is None:
            self._background_indices = torch.nonzero(self.background).flatten()
        return int(self._background_indices[torch.randint(len(self._background_indices), (1,), generator=generator)])

    def sample(self, crop_size: int, count: int, positive_fraction: float, generator: torch.Generator) -> list[tuple[int, int, int]]:
        if any(n < crop_size for n in self.shape):
            raise ValueError(f"volume {self.shape} is smaller than the crop {crop_size}: pad it first")
        starts = []
        for _ in range(count):
            positive = float(torch.rand((), generator=generator)) < positive_fraction
            if (positive and len(self.foreground)) or not self.background_count:
                index = self._foreground_index(generator)
            else:
                index = self._background_index(generator)
            centre = np.unravel_index(index, self.shape)
            starts.append(tuple(int(min(max(c - crop_size // 2, 0), n - crop_size)) for c, n in zip(centre, self.shape)))
        return starts


def sample_crop_starts(
    label: torch.Tensor,
    crop_size: int,
    count: int,
    positive_fraction: float,
    generator: torch.Generator,
    image: torch.Tensor | None = None,
) -> list[tuple[int, int, int]]:
    """`count` crop starts in a (S, X, Y, Z) label at least `crop_size` wide (see `CropSampler`)."""
    return CropSampler(label, image).sample(crop_size, count, positive_fraction, generator)


def _cut(tensor: torch.Tensor, start: Sequence[int], size: int) -> torch.Tensor:
    x, y, z = start
    return tensor[..., x : x + size, y : y + size, z : z + size]


# ---------------------------------------------------------------------------------------- training


@dataclass
class _Support:
    case: TrainingCase
    volume: torch.Tensor  # (1, X, Y, Z) padded
    label: torch.Tensor  # (S, X, Y, Z) uint8 padded
    sampler: CropSampler
    cache: FeatureCache | None = None
    owns_cache: bool = False


@dataclass
class _Query:
    case: TrainingCase
    features: torch.Tensor  # (1, F, x, y, z) fp16, pooled x2
    cover: torch.Tensor  # (x, y, z) float: full-resolution voxels of the unpadded query each cell covers


def _padded_size(settings: TrainingSettings, architecture) -> int:
    """Supports are padded to at least one crop and one sliding window in every dimension."""
    return max(settings.crop_size or architecture.patch_size, architecture.patch_size)


def cache_features(
    network: FoundationSwinUNETR,
    case: TrainingCase,
    device: torch.device = torch.device("cpu"),
    settings: TrainingSettings = TrainingSettings(),
    should_stop: Callable[[], bool] | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> FeatureCache:
    """The frozen features `adapt` computes for a support (padded the same way), to pass in
    `TrainingCase.features` when several black-box heads train on the same supports and network.
    The caller closes it."""
    volume = case.volume.as_tensor() if hasattr(case.volume, "as_tensor") else case.volume
    padded, offset = pad_to(volume.float(), _padded_size(settings, network.architecture))
    cache = _feature_cache(network, padded, device, settings, should_stop, on_window)
    cache.valid = (offset, tuple(volume.shape[-3:]))
    return cache


def _feature_cache(network, volume, device, settings: TrainingSettings, should_stop, on_window) -> FeatureCache:
    return FeatureCache(
        network,
        volume,
        device,
        overlap=settings.overlap,
        sw_batch_size=settings.sw_batch_size,
        precision=settings.precision,
        spill_bytes=settings.cache_spill_bytes,
        spill_dir=settings.cache_dir,
        should_stop=should_stop,
        on_window=on_window,
    )


def _chunks(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def adapt(
    model: AdaptedModel,
    supports: Sequence[TrainingCase],
    settings: TrainingSettings = TrainingSettings(),
    device: torch.device = torch.device("cpu"),
    progress: Progress | None = None,
    queries: Sequence[TrainingCase] = (),
    should_stop: Callable[[], bool] | None = None,
    structure_names: Sequence[str] = (),
) -> TrainingResult:
    """Train `model`'s trainable parameters on the labelled `supports` (in place); see the module doc.

    The head's random parts (adapter convolutions, novel-structure rows) are initialised when the
    `AdaptedModel` is built: seed torch before that for a fully reproducible run; everything here
    (support order, crops, augmentation) draws from generators seeded with `settings.seed`.
    `structure_names` name the head's outputs in `TrainingResult.size_prior` (default "0", "1", ...).
    """
    progress = progress or Progress()
    started = time.monotonic()
    network = model.network
    architecture = network.architecture
    crop = settings.crop_size or architecture.patch_size
    frozen = model.backbone_frozen
    cached = trains_on_cache(model, settings)
    outputs = model.structure_count
    _validate(model, supports, queries, settings, crop, frozen, cached, outputs)
    if structure_names and len(structure_names) != outputs:
        raise ValueError(f"{len(structure_names)} structure names for a head with {outputs} outputs")

    lr = learning_rate_for(model, settings)
    epochs = epochs_for(model, settings)
    weight_decay = weight_decay_for(model, settings)
    step_dtype = step_autocast_dtype(device, settings.precision, cached)
    channels_last = cached if settings.channels_last is None else settings.channels_last
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    per_pass = settings.crops_per_pass or (1 if not frozen else settings.crops_per_step)
    window = _padded_size(settings, architecture)

    generators = [torch.Generator().manual_seed(settings.seed + offset) for offset in range(3)]
    order_rng, crop_rng, shift_rng = generators

    model.to(device)
    network.train(not frozen)  # frozen backbone in eval mode, as the paper (no dropout or batch norm anyway)
    model.head.train()
    if channels_last:
        model.head.to(memory_format=torch.channels_last_3d)
    prepared: list[_Support] = []
    query_states: list[_Query] = []
    try:
        for case in supports:
            volume = case.volume.as_tensor() if hasattr(case.volume, "as_tensor") else case.volume
            volume, _ = pad_to(volume.float(), window)
            label, _ = pad_to(case.label.to(torch.uint8), window)
            prepared.append(_Support(case, volume, label, CropSampler(label, volume[0])))
        names = list(structure_names) or [str(channel) for channel in range(outputs)]
        priors_by_structure = _size_priors(supports, outputs, names) if settings.size_prior else None

        if cached or settings.size_prior:
            _cache_features(model, prepared, queries, query_states, settings, device, cached, progress, should_stop)

        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        warm = max(settings.warmup_epochs, 0)
        factor = settings.warmup_start_factor if settings.warmup_start_factor is not None else 1.0 / max(warm, 1)
        scheduler = WarmupCosineSchedule(
            optimizer, warmup_steps=warm, t_total=epochs, warmup_multiplier=min(max(factor, 0.0), 1.0)
        )
        scaler = torch.amp.GradScaler(device.type, enabled=step_dtype == torch.float16)
        if model.softmax:  # the paper's multi-class loss: softmax Dice over every channel, background included
            dice = DiceLoss(softmax=True, include_background=True, smooth_nr=1.0, smooth_dr=1.0)
        else:
            dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)
        cast = torch.autocast(device.type, dtype=step_dtype) if step_dtype else nullcontext()
        prior_start = settings.size_prior_start if settings.size_prior_start is not None else epochs // 4
        earliest_stop = settings.early_stop_after
        if settings.size_prior:
            earliest_stop = max(earliest_stop, prior_start + settings.early_stop_patience)

        progress.info(
            f"adapting with {model.method.name}: {model.trainable_count():,} trainable parameters, "
            f"{len(supports)} support(s), lr {lr:g}, feature cache {'on' if cached else 'off'}"
            + (f", size prior on {len(queries)} query volume(s)" if settings.size_prior else "")
        )

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            if cached:
                return model.head(inputs)
            if frozen:
                with torch.no_grad():
                    features = network.features(inputs)
                return model.head(features.contiguous(memory_format=memory_format))
            return model.head(network.features(inputs))

        def support_step(support: _Support) -> float:
            count = settings.crops_per_step
            starts = support.sampler.sample(crop, count, settings.positive_fraction, crop_rng)
            labels = torch.stack([_cut(support.label, start, crop) for start in starts]).float()
            if model.softmax:
                labels = torch.cat([1 - labels.amax(1, keepdim=True), labels], 1)  # background channel first
            if cached:
                source = support.cache.crops(starts, crop)  # (n, F, s, s, s)
            else:
                images = []
                for start in starts:
                    image = _cut(support.volume, start, crop)[None]
                    if float(torch.rand((), generator=shift_rng)) < settings.intensity_shift_prob:
                        offset = (2 * float(torch.rand((), generator=shift_rng)) - 1) * settings.intensity_shift
                        image = image + offset
                    images.append(image)
                source = torch.cat(images)  # (n, 1, s, s, s)
            total = 0.0
            for part in _chunks(count, per_pass):
                if part.start and should_stop is not None and should_stop():
                    raise Cancelled("adaptation cancelled; nothing was saved")
                batch = source[part.start : part.stop].to(device).contiguous(memory_format=memory_format)
                with cast:
                    logits = forward(batch)
                loss = dice(logits.float(), labels[part.start : part.stop].to(device))
                scaler.scale(loss * (len(part) / count)).backward()
                total += float(loss.detach()) * len(part) / count
            return total

        def prior_term() -> float:
            terms = []
            for query in query_states:
                sizes = _query_sizes(model, query, device, cast, memory_format)
                per_structure = [
                    _size_prior_loss(sizes[c], priors_by_structure[c]["voxels"], settings.size_prior_gamma)
                    for c in range(outputs)
                ]
                terms.append(torch.stack(per_structure).mean())
            term = settings.size_prior_weight * torch.stack(terms).mean()  # a query more must not weigh the prior more
            scaler.scale(term).backward()
            return float(term.detach())

        curve: list[dict] = []
        losses: list[float] = []
        stopped_early = False
        total_steps = epochs * len(prepared)
        steps_done = 0
        share = CACHE_PROGRESS_SHARE if (cached or settings.size_prior) else 0.0
        training_started = time.monotonic()
        for epoch in range(epochs):
            epoch_started = time.monotonic()
            lr_now = optimizer.param_groups[0]["lr"]
            order = torch.randperm(len(prepared), generator=order_rng).tolist()
            step_losses = []
            prior_loss = None
            for position, index in enumerate(order):
                if should_stop is not None and should_stop():
                    raise Cancelled("adaptation cancelled; nothing was saved")
                optimizer.zero_grad(set_to_none=True)
                step_losses.append(support_step(prepared[index]))
                if settings.size_prior and epoch >= prior_start and position == len(order) - 1:
                    if settings.size_prior_separate_step:  # the 2023 code: a step of its own after the epoch's last
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                    prior_loss = prior_term()
                scaler.step(optimizer)
                scaler.update()
                steps_done += 1
                progress.step(
                    share + (1 - share) * steps_done / total_steps,
                    f"epoch {epoch + 1}/{epochs}, step {position + 1}/{len(order)}",
                )
            scheduler.step()
            epoch_loss = float(np.mean(step_losses))
            losses.append(epoch_loss)
            seconds = time.monotonic() - epoch_started
            entry = {"epoch": epoch + 1, "loss": round(epoch_loss, 6), "lr": lr_now, "seconds": round(seconds, 3)}
            if prior_loss is not None:
                entry["size_prior_loss"] = round(prior_loss, 6)
            curve.append(entry)
            elapsed = time.monotonic() - training_started
            remaining = epochs - (epoch + 1)
            eta = elapsed / (epoch + 1) * remaining
            progress.emit(
                "epoch",
                epoch=epoch + 1,
                epochs=epochs,
                loss=round(epoch_loss, 5),
                lr=lr_now,
                elapsed=round(time.monotonic() - started, 1),
                eta=round(eta, 1),
                message=f"epoch {epoch + 1}/{epochs}: loss {epoch_loss:.4f}, lr {lr_now:.2e}, "
                f"{elapsed:.0f} s elapsed, at most {eta:.0f} s left",
            )
            if (
                settings.early_stop
                and len(losses) >= earliest_stop
                and plateaued(
                    losses,
                    settings.early_stop_after,
                    settings.early_stop_patience,
                    settings.early_stop_average,
                    settings.early_stop_min_delta,
                )
            ):
                stopped_early = True
                progress.info(f"training loss on a plateau: stopped after epoch {epoch + 1}")
                break

        size_prior = None
        if settings.size_prior:
            size_prior = _size_prior_record(
                model, query_states, priors_by_structure, names, settings, prior_start, device, cast, memory_format
            )
        return TrainingResult(
            epochs=len(curve),
            stopped_early=stopped_early,
            curve=curve,
            seconds=round(time.monotonic() - started, 3),
            learning_rate=lr,
            max_epochs=epochs,
            weight_decay=weight_decay,
            step_precision={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[step_dtype],
            feature_cache=cached,
            size_prior=size_prior,
        )
    finally:
        for support in prepared:
            if support.cache is not None and support.owns_cache:
                support.cache.close()
        query_states.clear()
        if channels_last:
            model.head.to(memory_format=torch.contiguous_format)  # artefacts store contiguous tensors
        model.eval()


def adapt_per_query(
    build_model: Callable[[], AdaptedModel],
    supports: Sequence[TrainingCase],
    queries: Sequence[TrainingCase],
    settings: TrainingSettings,
    device: torch.device = torch.device("cpu"),
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    structure_names: Sequence[str] = (),
) -> list[tuple[AdaptedModel, TrainingResult]]:
    """The paper's transductive episodes: per query, a new model from `build_model()` (seed inside it
    for identical starts) adapted on the supports with that query's size prior alone, in query order.

    A black-box method's support features are computed once and shared by every episode (each
    query's own features are computed in its episode)."""
    progress = progress or Progress()
    first = build_model()
    cached = trains_on_cache(first, settings)
    owned: list[FeatureCache] = []
    try:
        if cached:
            shared = []
            for case in supports:
                if case.features is None:
                    owned.append(cache_features(first.network, case, device, settings, should_stop))
                    case = TrainingCase(case.id, case.volume, case.label, owned[-1])
                shared.append(case)
            supports = shared
        episodes = []
        for number, query in enumerate(queries):
            model = first if number == 0 else build_model()
            progress.info(f"episode {number + 1}/{len(queries)}: size prior on query {query.id}")
            episodes.append((model, adapt(model, supports, settings, device, progress, [query], should_stop, structure_names)))
        return episodes
    finally:
        for cache in owned:
            cache.close()


def _validate(model, supports, queries, settings, crop, frozen, cached, outputs) -> None:
    if not supports:
        raise InputError("adaptation needs at least one labelled support volume")
    for case in supports:
        if case.label is None:
            raise InputError(f"support '{case.id}' has no label")
        if case.label.dim() != 4 or case.label.shape[0] != outputs:
            raise InputError(
                f"support '{case.id}': label has shape {tuple(case.label.shape)}, expected ({outputs}, X, Y, Z)"
            )
        if tuple(case.label.shape[1:]) != tuple(case.volume.shape[-3:]):
            raise InputError(f"support '{case.id}': label {tuple(case.label.shape[1:])} and image {tuple(case.volume.shape[-3:])} differ")
        if model.softmax and outputs > 1 and bool(((case.label != 0).sum(0) > 1).any()):
            raise InputError(f"support '{case.id}': structures overlap, and the softmax head gives each voxel one class (use the sigmoid head)")
    if (settings.max_epochs is not None and settings.max_epochs < 1) or settings.crops_per_step < 1:
        raise InputError("max_epochs and crops_per_step must be at least 1")
    if not cached and (problem := crop_size_problem(crop)):
        raise InputError(f"crop size {problem} for the network")
    if cached and not frozen:
        raise InputError("the feature cache needs a frozen backbone (a black-box method without --tune-decoder)")
    if settings.size_prior:
        if not frozen:
            from .methods import METHODS

            names = ", ".join(name for name, method in METHODS.items() if method.black_box)
            raise InputError(f"--size-prior needs a black-box method ({names}) without --tune-decoder")
        if not queries:
            raise InputError("--size-prior needs at least one unlabeled --query volume")
        if settings.size_prior_mode not in SIZE_PRIOR_MODES:
            raise InputError(f"unknown size-prior mode '{settings.size_prior_mode}'; choose {' or '.join(SIZE_PRIOR_MODES)}")
        if settings.size_prior_mode == "per-query" and len(queries) > 1:
            raise ValueError("per-query size prior: adapt one query at a time (adapt_per_query), or choose the joint mode")


def _size_priors(supports: Sequence[TrainingCase], outputs: int, names: Sequence[str]) -> list[dict]:
    """S per structure: the supports' (trimmed) mean size of their largest component, in voxels."""
    from . import priors

    result = []
    for channel in range(outputs):
        sizes = [float(priors.support_size(case.label[channel])) for case in supports]
        prior = float(priors.size_prior(sizes))
        if prior <= 0:
            raise InputError(f"--size-prior: the supports' labels of structure '{names[channel]}' are empty")
        result.append({"voxels": prior, "support_voxels": sizes})
    return result


def _size_prior_loss(predicted: torch.Tensor, prior: float, gamma: float) -> torch.Tensor:
    from . import priors

    return priors.size_prior_loss(predicted, prior, gamma)


def _cache_features(model, prepared, queries, query_states, settings, device, cached, progress, should_stop) -> None:
    """Frozen features of every support (when training on the cache) and every query (size prior)."""
    network = model.network
    roi = network.architecture.patch_size
    jobs: list[tuple[TrainingCase, torch.Tensor, _Support | None, tuple | None]] = []
    for support in prepared:
        if cached and support.case.features is not None:
            if support.case.features.shape != tuple(support.volume.shape[-3:]) or support.case.features.data is None:
                raise InputError(f"support '{support.case.id}': its precomputed features do not fit its padded volume")
            support.cache = support.case.features
        elif cached:
            jobs.append((support.case, support.volume, support, None))
    if settings.size_prior:
        for case in queries:
            if case.features is not None:  # precomputed (`cache_features`): pooled as it is, left open
                query_states.append(_query_state(case, case.features))
                continue
            volume = case.volume.as_tensor() if hasattr(case.volume, "as_tensor") else case.volume
            padded, offset = pad_to(volume.float(), roi)
            jobs.append((case, padded, None, (offset, tuple(volume.shape[-3:]))))
    counts = [window_count(volume.shape[-3:], roi, settings.overlap) for _, volume, _, _ in jobs]
    total = max(sum(counts), 1)
    for number, (case, volume, support, query) in enumerate(jobs):
        before = sum(counts[:number])

        def on_window(done: int, count: int, case_id=case.id, number=number, before=before) -> None:
            progress.step(
                CACHE_PROGRESS_SHARE * (before + done) / total,
                f"frozen features of {case_id} ({number + 1}/{len(jobs)}): window {done}/{count}",
            )

        cache = _feature_cache(network, volume, device, settings, should_stop, on_window)
        if support is not None:
            support.cache, support.owns_cache = cache, True  # closed by adapt() when training ends, however it ends
            continue
        with cache:
            cache.valid = query
            query_states.append(_query_state(case, cache))


def _query_state(case: TrainingCase, cache: FeatureCache) -> _Query:
    """A query's pooled features and, per pooled cell, how many voxels of the unpadded query it covers."""
    offset, shape = cache.valid
    valid = torch.zeros((1, 1, *cache.shape))
    valid[(0, 0, *(slice(o, o + n) for o, n in zip(offset, shape)))] = 1
    cover = F.avg_pool3d(valid, 2, ceil_mode=True, divisor_override=1)[0, 0]
    return _Query(case, cache.pooled(2), cover)


def _query_sizes(model, query: _Query, device, cast, memory_format) -> torch.Tensor:
    """Predicted size of each structure in the query: sum of probabilities, in full-resolution voxels."""
    features = query.features.to(device).float().contiguous(memory_format=memory_format)
    with cast:
        logits = model.head(features)
    logits = logits.float()[0]
    probabilities = torch.softmax(logits, 0)[1:] if model.softmax else torch.sigmoid(logits)
    return (probabilities * query.cover.to(device)).sum(dim=(1, 2, 3))


def _size_prior_record(model, query_states, priors_by_structure, names, settings, prior_start, device, cast, memory_format) -> dict:
    """Per structure: the prior S (voxels and mL), its accepted range, and each query's final predicted size."""
    voxel_ml = model.network.architecture.spacing_mm**3 / 1000.0
    gamma = settings.size_prior_gamma
    with torch.no_grad():
        final = {query.case.id: _query_sizes(model, query, device, cast, memory_format).tolist() for query in query_states}
    record = {}
    for channel, (name, prior) in enumerate(zip(names, priors_by_structure)):
        voxels = prior["voxels"]
        record[name] = {
            "prior_voxels": round(voxels, 2),
            "prior_ml": round(voxels * voxel_ml, 3),
            "range_ml": [round((1 - gamma) * voxels * voxel_ml, 3), round((1 + gamma) * voxels * voxel_ml, 3)],
            "support_voxels": prior["support_voxels"],
            "gamma": gamma,
            "weight": settings.size_prior_weight,
            "start_epoch": prior_start + 1,
            "queries": {
                query_id: {"voxels": round(sizes[channel], 2), "ml": round(sizes[channel] * voxel_ml, 3)}
                for query_id, sizes in final.items()
            },
        }
    return record
