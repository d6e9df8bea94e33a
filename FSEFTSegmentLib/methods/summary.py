"""What a user needs to choose a method before launching (`fseft methods`).

Per method: trainable parameters, the paper's learning rate (the 2023 workshop's for its methods,
whose schedule the note gives), whether it is black-box (needs no access to the weights, nor
gradients through them) and an estimate of training memory. Everything comes from a registry entry's
`Architecture` alone: the network is built once with random weights, emptied onto PyTorch's "meta"
device (shapes, no data), and each method is applied to a copy through
the same `AdaptedModel` the training loop uses — so the counts are exactly what training will train,
and no weights file is needed.

**Training memory**: the GPU peak of a training step as `training.adapt` runs it by default, in fp32
(its default bf16 autocast on a GPU saves part of the activations: read the figure as an upper
bound), in GiB (2^30 bytes, as GPU memory is counted):

    4 B x every parameter, plus the buffers   the whole model stays loaded (it computes the feature
                                              cache and predicts too)
  + 12 B x trainable parameters               gradient (kept across a step's passes) and AdamW's
                                              two moments
  + the peak of one forward/backward pass     every tensor alive at once during forward, Dice loss
                                              and backward: the input crops, the activations
                                              autograd saves, the transient ones (under gradients
                                              MONAI's window attention materialises its maps)
                                              and the activation gradients

A pass is what the training loop feeds at once (`crops_per_pass`): a black-box method trains its head
alone on cached frozen `decoder1` features, all `CROPS` (6) crops of patch³ at once; a method whose
gradients flow through the backbone runs the 6 crops one at a time, accumulating gradients. (The
parameter gradients are also inside the measured pass peak, so up to 4 B x trainable is counted
twice: conservative, and only noticeable for full fine-tuning.) The feature cache itself lives in RAM
or on disk as float16 — 2·F bytes per voxel of the supports (0.10 GB per million voxels at F = 48) —
which the note column says.

The pass peak is *measured*, not modelled: `measure_pass_peak` runs the pass under a dispatch mode
that follows every tensor an operation creates until it is freed, and keeps the maximum of the live
bytes. On the meta device this costs no memory and no arithmetic and gives the same bytes as real
tensors (identical on the CPU, where the process's resident-memory peak over the pass is 0–12 %
above it, the rest being the kernels' first-use allocations: see Testing/test_methods.py). For the registry's architecture the
results are stored in `REFERENCE_PASS_PEAK_MIB` (instant; a test re-measures them); for any other
architecture or method the pass is simulated on the spot (about a second per method).

Not counted, so leave headroom: the CUDA context (~0.3–1 GiB outside PyTorch's allocator), the
caching allocator's rounding and fragmentation, cuDNN workspaces, AdamW's transient buffers (up to
the size of the trainable parameters), and the size prior's pass over pooled query features
(`--size-prior`), which grows with the query volume.
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import InputError
from ..model.network import Architecture, FoundationSwinUNETR
from . import METHODS, get_method
from .adapted import AdaptedModel

#: crops per training step (one volume x 6 random crops, paper-facts §6; training.TrainingSettings)
CROPS = 6
#: bytes per cached feature value (feature_cache.py stores the frozen features as float16)
CACHE_BYTES = 2
MIB = 2**20
GIB = 2**30

#: The architecture `REFERENCE_PASS_PEAK_MIB` was measured for: the registry's `fseft-swinunetr`.
REFERENCE_SHAPE = {"feature_size": 48, "in_channels": 1, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24), "patch_size": 96}

#: Peak MiB of one forward/backward pass (`crops_per_pass` crops) for the reference architecture,
#: keyed by (method, decoder tuned): (one structure, each further structure). Measured with
#: `simulate_pass_peak` for 1 and 2 structures (torch 2.13, MONAI 1.6.1); linear in the number of
#: structures (checked up to 4). `test_reference_peaks_are_current` re-measures every entry.
REFERENCE_PASS_PEAK_MIB: dict[tuple[str, bool], tuple[float, float]] = {
    ("linear-probe", False): (1032.8, 60.8),  # 6 crops; 972 MiB of it are the cached feature crops
    ("linear-probe", True): (1977.1, 3.4),  # 1 crop from here on
    ("spatial-adapter", False): (3928.5, 40.5),  # 6 crops
    ("spatial-adapter", True): (1977.6, 3.4),
    ("adapter-1x1", False): (3928.5, 40.5),  # 6 crops
    ("adapter-1x1", True): (1977.1, 3.4),
    ("bitfit", False): (3909.6, 3.4),
    ("bitfit", True): (3909.6, 3.4),
    ("affine-ln", False): (3924.6, 3.4),
    ("affine-ln", True): (3924.6, 3.4),
    ("lora", False): (3980.4, 3.4),
    ("lora", True): (3980.4, 3.4),
    ("adaptformer", False): (3310.7, 3.4),  # its first trainable module follows block 0's attention
    ("adaptformer", True): (3310.7, 3.4),
    ("full", False): (5266.3, 3.4),
    ("adapter-2023", False): (8768.3, 20.3),  # 6 crops; its instance norms and LeakyReLUs keep full-size maps
    ("adapter-2023", True): (2625.1, 3.4),
    ("ft-last", False): (1809.0, 3.4),  # backward through decoder1 only
}


# ---------------------------------------------------------------- measuring


class _LiveTensors(TorchDispatchMode):
    """Follows every tensor an operation creates until it is freed; keeps the peak of live bytes.

    Tensors are grouped by storage (a view costs nothing); a storage counts until the last tensor
    on it dies (weak references: PyTorch keeps a tensor's Python object alive as long as the tensor,
    so a tensor autograd saved for backward still counts). Storages in `exclude` (the parameters and
    buffers, counted as weights) are not counted, not even through a view such as `weight.t()`.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._exclude = {tensor.untyped_storage()._cdata for tensor in exclude}
        self.live = 0
        self.peak = 0
        self._owners: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _released(self, key: int, ref: weakref.ref) -> None:
        self._refs.pop(id(ref), None)
        self._owners[key] -= 1
        if not self._owners[key]:
            del self._owners[key]
            self.live -= self._bytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(result)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata  # the storage's identity (data pointers are all 0 on meta)
                if key in self._exclude:
                    continue
                if key not in self._owners:
                    self._owners[key] = 0
                    self._bytes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                self._owners[key] += 1
                ref = weakref.ref(tensor, functools.partial(self._released, key))
                self._refs[id(ref)] = ref
        self.peak = max(self.peak, self.live)
        return result

    def close(self) -> None:
        """Stop following: drop the weak references (their callbacks then never run)."""
        self._refs.clear()


def _dice_loss(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(2, probabilities.dim()))
    overlap = (probabilities * target).sum(dims)
    return (1 - (2 * overlap + 1) / (probabilities.sum(dims) + target.sum(dims) + 1)).mean()


def measure_pass_peak(module: nn.Module, input_shape: Sequence[int], device="meta") -> int:
    """Peak bytes alive at once during one pass: input batch, forward, sigmoid Dice loss, backward.

    `module` is what trains (an `AdaptedModel`, or its head on cached features). Counts the input
    and everything created after it, parameter gradients included; not the parameters and buffers.
    On the meta device nothing is computed or allocated.
    """
    without_grad = [p for p in module.parameters() if p.grad is None]
    tracker = _LiveTensors(exclude=[*module.parameters(), *module.buffers()])
    try:
        with tracker:
            batch = torch.zeros(tuple(input_shape), device=device)
            probabilities = torch.sigmoid(module(batch))
            loss = _dice_loss(probabilities, torch.zeros_like(probabilities))
            loss.backward()
            del batch, probabilities, loss
        return tracker.peak
    finally:
        tracker.close()
        for parameter in without_grad:  # leave the module's gradients as they were
            parameter.grad = None


def crops_per_pass(model: AdaptedModel) -> int:
    """Crops per forward/backward pass, as `training.adapt` by default: all `CROPS` on cached features
    (black-box), one at a time when gradients flow through the backbone."""
    return CROPS if model.backbone_frozen else 1


def pass_input_shape(model: AdaptedModel) -> tuple[int, ...]:
    """The batch of one pass: cached feature crops (black-box) or image crops."""
    architecture = model.network.architecture
    channels = architecture.feature_size if model.backbone_frozen else architecture.in_channels
    return (crops_per_pass(model), channels) + (architecture.patch_size,) * 3


def simulate_pass_peak(model: AdaptedModel) -> int:
    """`measure_pass_peak` of `model`'s training pass, run on a meta copy (free at any size)."""
    meta = model if all(p.device.type == "meta" for p in model.parameters()) else copy.deepcopy(model).to("meta")
    return measure_pass_peak(meta.head if meta.backbone_frozen else meta, pass_input_shape(meta), device="meta")


# ---------------------------------------------------------------- the estimate


def _is_reference(architecture: Architecture) -> bool:
    return all(getattr(architecture, key) == value for key, value in REFERENCE_SHAPE.items())


def pass_peak_bytes(model: AdaptedModel) -> int:
    """The pass peak: from `REFERENCE_PASS_PEAK_MIB` when measured already, else simulated."""
    key = (model.method.name, model.tune_decoder)
    if key in REFERENCE_PASS_PEAK_MIB and _is_reference(model.network.architecture):
        first, further = REFERENCE_PASS_PEAK_MIB[key]
        structures = model.head[-1].out_channels
        return round((first + further * (structures - 1)) * MIB)
    return simulate_pass_peak(model)


def training_memory_bytes(model: AdaptedModel) -> int:
    """Weights and buffers + gradients and AdamW moments + the measured pass peak (module docstring)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    return weights + 12 * model.trainable_count() + pass_peak_bytes(model)


# ---------------------------------------------------------------- the summary


@functools.lru_cache(maxsize=4)
def _meta_network(architecture: Architecture) -> FoundationSwinUNETR:
    # Built on the CPU (MONAI's constructor calls .item(), which the meta device cannot), then
    # emptied to shapes only; callers deep-copy it (cheap: no data).
    with torch.device("cpu"):
        return FoundationSwinUNETR(architecture).to("meta")


def adapted_on_meta(architecture: Architecture, method_name: str, structures: int = 1, tune_decoder: bool = False) -> AdaptedModel:
    """`AdaptedModel` of a method on a data-free copy of the architecture's network (for counting)."""
    network = copy.deepcopy(_meta_network(architecture))
    with torch.device("meta"):  # modules a method adds, and the new head
        return AdaptedModel(network, get_method(method_name), [None] * structures, tune_decoder)


def method_summaries(architecture: Architecture, structures: int = 1, tune_decoder: bool = False) -> list[dict]:
    """One row per method (in `METHODS` order), JSON-ready.

    Keys: method, description, trainable_parameters, learning_rate (the paper's, for this decoder
    setting), black_box (trains nothing inside the network: no weights access needed, features
    cacheable; --tune-decoder makes every method white-box), decoder ("frozen", "tuned", or "n/a"
    for a method that trains it anyway and so ignores --tune-decoder), training_memory_gb (GiB, see
    the module docstring; None if it could not be simulated), note.
    """
    if isinstance(structures, bool) or not isinstance(structures, int) or structures < 1:
        raise InputError(f"--structures must be a positive whole number, got {structures!r}")
    rows = []
    for name, method_class in METHODS.items():
        tuned = tune_decoder and method_class.combines_with_decoder
        model = adapted_on_meta(architecture, name, structures, tuned)
        notes = []
        if model.backbone_frozen:
            per_million = CACHE_BYTES * architecture.feature_size * 1e6 / 1e9
            notes.append(f"features cached once: {per_million:.2f} GB per million voxels (RAM/disk)")
        else:
            trained = [n for n, p in model.network.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
            if all(n.startswith("decoder") for n in trained):
                reach = "the decoder"
            elif len(trained) == sum(1 for n, _ in model.network.named_parameters() if not n.startswith("classifier.")):
                reach = "the whole network"
            else:
                reach = "the Swin encoder"
            notes.append(f"backward through {reach}, one crop at a time")
        if tune_decoder and not method_class.combines_with_decoder:
            notes.append("trains decoder parameters itself: --tune-decoder does not apply")
        if method_class.workshop:
            decay = _power_of_ten(method_class.weight_decay)
            notes.append(f"2023 workshop schedule: {method_class.max_epochs} epochs, weight decay {decay}")
        try:
            memory = round(training_memory_bytes(model) / GIB, 2)
        except Exception as error:  # a future PyTorch/MONAI the simulation cannot follow: say so, list the rest
            memory = None
            notes.append(f"memory not estimated ({type(error).__name__})")
        rows.append(
            {
                "method": name,
                "description": method_class.description,
                "trainable_parameters": model.trainable_count(),
                "learning_rate": method_class.learning_rate_with_decoder if tuned else method_class.learning_rate,
                "black_box": model.backbone_frozen,
                "decoder": ("tuned" if tuned else "frozen") if method_class.combines_with_decoder else "n/a",
                "training_memory_gb": memory,
                "note": "; ".join(notes),
            }
        )
    return rows


def _power_of_ten(value: float) -> str:
    """1e-2, not 1e-02."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def summaries_table(rows: list[dict]) -> str:
    """`method_summaries` rows as an aligned text table, then the notes and the memory caveat."""
    header = ("method", "trainable", "lr", "black-box", "decoder", "memory", "description")
    body = [
        (
            row["method"],
            f"{row['trainable_parameters']:,}",
            _power_of_ten(row["learning_rate"]),
            "yes" if row["black_box"] else "no",
            row["decoder"],
            "?" if row["training_memory_gb"] is None else f"{row['training_memory_gb']:.1f} GiB",
            row["description"],
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    right = {1, 5}  # numbers

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(header), *(line(cells) for cells in body), ""]
    lines += [f"{row['method']}: {row['note']}" for row in rows if row["note"]]
    lines.append(
        f"memory: estimated GPU peak of a training step ({CROPS} crops; fp32, so an upper bound under the "
        "default bf16 autocast); leave 1-2 GiB more for the CUDA context and the allocator"
    )
    return "\n".join(lines)
