"""Typed configuration of an extraction: the model, the variant, the cluster, the run record.

An :class:`ExtractConfig` is composed of three small frozen parts, each owning its
fields once:

* :class:`ModelConfig`: what a worker builds (also the key of its model cache);
* :class:`Variant`: the preprocessing variant, alignment and ROI (store name ``ALIGN-ROI``);
* :class:`ClusterConfig`: where batches run (scheduler kind or address, workers, threads,
  memory limit, allocator mode).

Flat settings (the CLI's options, an experiment's ``extract:`` block) become a config
through :meth:`ExtractConfig.from_settings`, which routes each key to the part that owns
it and names any key that no part has. This module imports nothing heavy: the CLI reads
its choice lists at start-up.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from medfeat.engine.pipeline.malloc import MALLOC_MODES
from medfeat.errors import InputError, UnknownNameError

ALIGNMENTS = ("none", "rigid", "affine", "oracle", "atlas", "oracle_atlas")
GRAY_MODES = ("repeat", "first_channel")
RESIZE_MODES = ("shorter", "square")
ROIS = ("whole", "crop")
SCHEDULER_KINDS = ("auto", "local", "threads", "sync")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the model a worker builds (hashable: the cache key)."""

    name: str
    taps: tuple[str, ...]
    weights: str | None = None
    tiny: bool = False
    pooling: str | None = None
    seed: int = 0
    runtime: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    input_size: tuple[int, ...] | None = None
    # Items per call of the runtime (None: the whole batch); ``--runtime auto`` sets it when
    # a smaller call is faster per item (see MicroBatched).
    micro_batch: int | None = None
    # How many torch threads a worker uses is not part of the model's identity (cache key).
    torch_threads: int | None = field(default=None, compare=False)
    # Modules to import before building: they register extra backbones (plugins, tests),
    # which spawned worker processes would otherwise not know.
    modules: tuple[str, ...] = ()
    # 2D models only. ``gray``: how a grey image enters the first convolution, "repeat" (to
    # every channel) or "first_channel" (the weights cut to the image's one channel, the
    # transfer study's choice); None keeps the model's build default. ``resize``: "shorter"
    # (torchvision Resize(256) geometry) or "square" (Resize((256, 256)), the study's), then
    # the centre crop. ``mean_std``: a dataset's own per-channel (mean, std) on [0, 1] pixels
    # that replaces the model's intensity rule (the study normalises with each dataset's
    # statistics); None keeps the model's rule. All three go into the arrays' provenance.
    gray: str | None = None
    resize: str = "shorter"
    mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    # Token arrays (pooling ``tokens``): ``views`` augmented views per item besides the eval
    # view 0, drawn by ``augment`` (``study``) from seeds (seed, item, view), stored in
    # ``token_dtype``. They change the inputs, not the model: not part of the cache key.
    views: int = field(default=0, compare=False)
    augment: str = field(default="none", compare=False)
    token_dtype: str = field(default="float16", compare=False)

    # Generic models (timm:, hf:, onnx:, torchscript:, module:): what their file does not
    # declare, and build arguments ((key, value) pairs; any model's build config overrides).
    input_kind: str | None = None
    intensity: str | None = None
    model_args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.gray is not None and self.gray not in GRAY_MODES:
            raise UnknownNameError(f"unknown gray mode {self.gray!r}; modes: {', '.join(GRAY_MODES)}")
        if self.resize not in RESIZE_MODES:
            raise UnknownNameError(f"unknown resize mode {self.resize!r}; modes: {', '.join(RESIZE_MODES)}")
        if self.mean_std is not None:
            mean, std = self.mean_std
            if len(mean) not in (1, 3) or len(std) != len(mean) or min(std) <= 0:
                raise InputError(f"mean_std needs 1 or 3 means and as many positive stds, got {mean} / {std}")

    @property
    def image_settings(self) -> bool:
        """Whether any 2D-only setting differs from its default."""
        return self.gray is not None or self.resize != "shorter" or self.mean_std is not None


@dataclass(frozen=True)
class Variant:
    """A preprocessing variant: ``align`` (see ``items``), ``roi`` (``whole`` or ``crop``),
    and the mask labels whose box is the crop (``None``: every non-zero label)."""

    align: str = "none"
    roi: str = "whole"
    roi_labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.align not in ALIGNMENTS:
            raise UnknownNameError(f"unknown alignment {self.align!r}; alignments: {', '.join(ALIGNMENTS)}")
        if self.roi not in ROIS:
            raise UnknownNameError(f"unknown ROI {self.roi!r}; ROIs: {', '.join(ROIS)}")

    @property
    def name(self) -> str:
        """The store's variant name, e.g. ``none-whole``, ``rigid-crop``."""
        return f"{self.align}-{self.roi}"

    @classmethod
    def parse(cls, text: str, roi_labels: tuple[int, ...] | None = None) -> Variant:
        """``ALIGN-ROI`` (e.g. ``rigid-crop``) -> Variant."""
        align, sep, roi = str(text).rpartition("-")
        if not sep:
            raise UnknownNameError(f"variant {text!r} is not ALIGN-ROI, e.g. none-whole or rigid-crop")
        return cls(align, roi, roi_labels)


@dataclass(frozen=True)
class ClusterConfig:
    """Where batches run: a scheduler kind (``auto``, ``local``, ``threads``, ``sync``) or the
    address of an existing Dask scheduler, with workers, threads per worker, a per-worker
    memory limit (``"2GB"``) and the allocator mode of the processes it starts.

    ``auto`` (the default) runs on threads in this process on one machine, where Dask
    worker processes only add their start (imports, a second model build: seconds) and
    the transfer of every batch; it becomes a Dask ``LocalCluster`` when workers are asked
    for (``workers``) and connects when an address is given.
    """

    scheduler_kind: str = "auto"
    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 2
    memory_limit: str | None = None
    malloc: str = "retain"

    def __post_init__(self) -> None:
        if self.scheduler_kind not in SCHEDULER_KINDS:
            raise UnknownNameError(f"unknown scheduler kind {self.scheduler_kind!r}; "
                                   f"kinds: {', '.join(SCHEDULER_KINDS)}")
        if self.malloc not in MALLOC_MODES:
            raise UnknownNameError(f"unknown malloc mode {self.malloc!r}; modes: {', '.join(MALLOC_MODES)}")
        if self.memory_limit is not None:
            parse_memory_limit(self.memory_limit)
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers={self.workers}: need at least 1")
        if self.threads_per_worker < 1:
            raise InputError(f"threads_per_worker={self.threads_per_worker}: need at least 1")

    @property
    def kind(self) -> str:
        """The scheduler kind that runs: ``auto`` resolved (see the class docstring)."""
        if self.scheduler_kind != "auto":
            return self.scheduler_kind
        return "local" if self.scheduler or self.workers else "threads"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_limit(text: str) -> float | None:
    """Bytes of a Dask memory limit (``"2GB"``, ``"1.5 GiB"``, ``"4e9"``), a fraction of the
    machine (``"0.5"``), or None for ``"auto"``; InputError for anything else."""
    s = str(text).strip().lower()
    if s == "auto":
        return None
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz ").strip()
    unit = s[len(number):].strip()
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _UNITS or not value > 0:
        raise InputError(f"memory limit {text!r}: give bytes with a unit (e.g. 2GB, 1.5GiB), a fraction "
                         "of the machine (0.5) or auto")
    return value * _UNITS[unit]


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction run: manifest and store, the model, the variant, the cluster, how the
    driver batches (``batch_size`` items per task, ``chunk_items`` per store chunk for new
    stores, at most ``window`` batches in flight), plugins to load, and which visits pair up
    (:mod:`medfeat.io.visits`)."""

    manifest: str
    store: str
    model: ModelConfig
    variant: Variant = field(default_factory=Variant)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    batch_size: int = 4
    chunk_items: int | None = None
    window: int | None = None
    retry_failed: bool = False
    # Weights: ``model.weights`` must name a file unless the run asks for random weights.
    random_init: bool = False
    # Items whose source files changed since extraction: refused unless refreshed.
    refresh_changed: bool = False
    # Items to extract again although done: their ids, or ("all",).
    overwrite: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    # which visits pair up (pair models) and which is the baseline (alignment): io.visits
    baseline_visit: str | None = None
    followup_visit: str | None = None
    pairs: str | None = None
    atlas: str | None = None
    atlas_mask: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"batch_size={self.batch_size}: need at least 1")
        if self.chunk_items is not None and self.chunk_items < 1:
            raise InputError(f"chunk_items={self.chunk_items}: need at least 1")

    @classmethod
    def settings(cls) -> set[str]:
        """Every flat setting :meth:`from_settings` takes (besides manifest, store, model, taps)."""
        own = {f.name for f in fields(cls)} - {"manifest", "store", "model", "variant", "cluster"}
        return own | _MODEL_KEYS | _VARIANT_KEYS | _CLUSTER_KEYS

    @classmethod
    def from_settings(cls, manifest: str, store: str, model: str, taps: tuple[str, ...] | list[str],
                      **settings: Any) -> ExtractConfig:
        """A config from flat settings (CLI options, an experiment's ``extract:`` block).

        Raises InputError naming a setting that no part of the config has.
        """
        unknown = sorted(set(settings) - cls.settings())
        if unknown:
            raise InputError(f"unknown extract setting(s) {', '.join(unknown)}; "
                             f"settings: {', '.join(sorted(cls.settings()))}")
        pick = {k: settings[k] for k in _MODEL_KEYS if k in settings}
        for key in ("input_size", "modules"):
            if pick.get(key) is not None:
                pick[key] = tuple(pick[key])
        if pick.get("mean_std") is not None:
            pick["mean_std"] = parse_mean_std(pick["mean_std"])
        if pick.get("model_args") is not None:
            pick["model_args"] = frozen_args(pick["model_args"])
        mcfg = ModelConfig(str(model), tuple(str(t) for t in taps), **pick)
        vpick = {k: settings[k] for k in _VARIANT_KEYS if k in settings}
        if vpick.get("roi_labels") is not None:
            vpick["roi_labels"] = tuple(int(v) for v in vpick["roi_labels"])
        cpick = {k: settings[k] for k in _CLUSTER_KEYS if k in settings}
        own = {k: v for k, v in settings.items() if k not in _MODEL_KEYS | _VARIANT_KEYS | _CLUSTER_KEYS}
        if "overwrite" in own:
            own["overwrite"] = tuple(own["overwrite"])
        if own.get("plugins") is not None:
            own["plugins"] = tuple(str(p) for p in own["plugins"])
        return cls(str(manifest), str(store), mcfg, Variant(**vpick), ClusterConfig(**cpick), **own)

    def with_model(self, **changes: Any) -> ExtractConfig:
        """This config with ``changes`` to its model config."""
        return replace(self, model=replace(self.model, **changes))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested form (tuples as lists), for run records."""
        return _jsonable(asdict(self))


def frozen_args(args: Any) -> tuple[tuple[str, Any], ...]:
    """Build arguments (a mapping or pairs) as sorted, hashable ``(key, value)`` pairs (lists
    become tuples), so a model config stays a cache key."""
    def freeze(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(freeze(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((str(k), freeze(x)) for k, x in v.items()))
        return v

    pairs = args.items() if isinstance(args, dict) else args
    return tuple(sorted((str(k), freeze(v)) for k, v in pairs))


_MODEL_KEYS = {f.name for f in fields(ModelConfig)} - {"name", "taps", "torch_threads"}


def parse_mean_std(value: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)``, ``{"mean": ..., "std": ...}`` or ``"M[,M,M]/S[,S,S]"`` -> two float tuples."""
    try:
        if isinstance(value, str):
            text_mean, text_std = value.split("/")
            value = (text_mean.split(","), text_std.split(","))
        if isinstance(value, dict):
            value = (value["mean"], value["std"])
        mean, std = ((v,) if isinstance(v, (int, float)) else v for v in value)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"mean_std {value!r}: expected MEAN/STD per channel, e.g. 0.503/0.292 or "
                         "0.415,0.221,0.073/0.275,0.150,0.081") from None
_VARIANT_KEYS = {f.name for f in fields(Variant)}
_CLUSTER_KEYS = {f.name for f in fields(ClusterConfig)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class ItemCounts:
    """Items of one run: in the plan, skipped (done or failed before), done now, failed."""

    total: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    # failed items of this run's arrays after it: failed now, or before and not retried
    remain_failed: int = 0


@dataclass
class RunRecord:
    """What one extraction did; returned by ``extract`` and appended to the store's runs.

    ``timings`` are seconds per stage (read, preprocess, infer, write; summed over tasks)
    plus ``pipeline_wall``; ``failures`` are ``{item_id, reason}``.
    """

    config: dict[str, Any]
    variant: str
    arrays: list[str]
    scheduler: str
    versions: dict[str, str]
    items: ItemCounts
    timings: dict[str, float]
    items_per_s: float | None
    failures: list[dict[str, str]]
    started: str = ""
    finished: str = ""
    wall_s: float = 0.0
    command: str = "extract"
    notes: list[str] = field(default_factory=list)  # e.g. duplicate manifest rows dropped
    refreshed: list[str] = field(default_factory=list)  # items re-extracted: changed sources, overwrite

    @property
    def store(self) -> str:
        return str(self.config["store"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RunRecord:
        """Read a record back (older records may lack fields added since; they default)."""
        known = {f.name for f in fields(cls)}
        body = {k: v for k, v in doc.items() if k in known}
        missing = {"config", "variant", "arrays", "scheduler", "versions", "items", "timings",
                   "items_per_s", "failures"} - set(body)
        if missing:
            raise InputError(f"run record lacks {', '.join(sorted(missing))}")
        body["items"] = ItemCounts(**body["items"])
        return cls(**body)
