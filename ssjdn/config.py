"""SSJDN configuration: plain dataclasses loaded from YAML, strictly validated (unknown keys are errors).

`load_config("cpu-small")` reads `ssjdn/configs/cpu-small.yaml`; any other argument is a path to a YAML file.
A YAML file may start from another config with `base: NAME_OR_PATH` and then override fields.
Overrides are a dict of dotted keys (`{"model.bsd": False}`) or nested dicts, applied last.
`config_to_dict` / `config_from_dict` give the plain-data form stored in checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

LOSS_NAMES = ("stl", "triplet", "infonce", "stl_nce")
TRIPLET_VARIANTS = ("sum", "hardest")
TEXT_KINDS = ("bert", "gru")
POOLINGS = ("mean", "cls")
AGREEMENTS = ("auto", "labels", "posterior")
SCHEDULES = ("cosine", "step", "constant")
BSD_DIRECTIONS = ("chain", "parallel")
BSD_SUPPRESSIONS = ("spatial", "content")
BSD_FUSIONS = ("concat", "gate")
OPTIMIZERS = ("adam", "adamw")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the file."""


@dataclass
class ImageConfig:
    # Hub name or local directory of a transformers ResNet checkpoint; used only when `pretrained` is true.
    name: str = "microsoft/resnet-50"
    pretrained: bool = False
    # Layout used when `pretrained` is false (random weights). Defaults: the ResNet-50 layout.
    layer_type: str = "bottleneck"
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    embedding_size: int = 64
    out_features: list[str] = field(default_factory=lambda: ["stage2", "stage3", "stage4"])
    freeze: bool = False


@dataclass
class TextConfig:
    kind: str = "bert"  # bert | gru
    # bert: hub name, local directory, "minilm" (the offline MiniLM package) or "default"
    # ("bert-base-uncased", or "minilm" when HF_HUB_OFFLINE is set and the package is installed).
    name: str = "default"
    pretrained: bool = (
        True  # false: same architecture (config of `name`, plus `config_overrides`) with random weights
    )
    config_overrides: dict[str, Any] = field(default_factory=dict)
    pooling: str = "mean"  # mean | cls
    max_length: int = 32
    freeze_embeddings: bool = False  # freeze the (large) word-embedding table: cheaper steps, small data
    # gru: vocabulary from the training captions
    vocab_min_count: int = 1
    word_dim: int = 300
    gru_hidden: int = 512
    gru_layers: int = 1


@dataclass
class BSDConfig:
    suppression_init: float = 0.5  # initial strength beta of the salience-guided suppression, in (0, 1)
    # Variants (docs/model.md); the defaults are the original BSD. They have no effect when model.bsd is false.
    # direction: chain (neighbour to neighbour, both ways) | parallel (from all other scales at once)
    direction: str = "chain"
    suppression: str = "spatial"  # spatial: where the other scale was salient | content: what it extracted
    fusion: str = (
        "concat"  # concat: concatenation + linear | gate: a per-sample softmax gate over the clues first
    )
    scale_loss_weight: float = 0.0  # > 0: each clue also gets its own retrieval loss (the fused one's loss)


@dataclass
class LSDConfig:
    num_classes: int = 0  # 0: taken from the dataset at training time
    heads: int = 4


@dataclass
class ModelConfig:
    embed_dim: int = 512
    width: int = 512  # common channel width the scale maps and text tokens are projected to
    bsd: bool = True
    lsd: bool = True
    dropout: float = 0.1
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    bsd_cfg: BSDConfig = field(default_factory=BSDConfig)
    lsd_cfg: LSDConfig = field(default_factory=LSDConfig)


@dataclass
class STLConfig:
    agreement: str = "auto"  # auto (labels where both known, else LSD posteriors) | labels | posterior
    relief: float = 1.0  # kappa = relief * margin * agreement; 0 turns STL into the plain triplet loss


@dataclass
class LossConfig:
    # stl | triplet | infonce | stl_nce (InfoNCE with STL's same-class relief: the default val picked, docs/results.md)
    name: str = "stl_nce"
    variant: str = "hardest"  # sum | hardest (triplet and stl)
    margin: float = 0.2
    temperature: float = 0.07  # infonce
    lsd_weight: float = 1.0  # weight of the LSD cross-entropy terms
    stl: STLConfig = field(default_factory=STLConfig)


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 2e-4
    weight_decay: float = 0.0
    text_lr_scale: float = 0.1  # pretrained text encoder learns slower
    backbone_lr_scale: float = 1.0
    schedule: str = "cosine"  # cosine | step | constant
    warmup_steps: int = 0
    warmup_fraction: float = 0.05  # used when warmup_steps is 0
    step_epochs: int = 20  # step schedule: decay every N epochs
    step_gamma: float = 0.1
    grad_clip: float = 2.0


@dataclass
class DataConfig:
    image_size: int = 256
    crop_scale_min: float = 0.6  # random-resized-crop lower area bound (train)
    rotate90: bool = True  # remote-sensing scenes have no canonical orientation
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 100
    eval_batch_size: int = 128
    num_workers: int = 2
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    log_every: int = 20


@dataclass
class SSJDNConfig:
    name: str = "ssjdn"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_CHOICES = {
    ("loss", "name"): LOSS_NAMES,
    ("loss", "variant"): TRIPLET_VARIANTS,
    ("loss", "stl", "agreement"): AGREEMENTS,
    ("model", "bsd_cfg", "direction"): BSD_DIRECTIONS,
    ("model", "bsd_cfg", "suppression"): BSD_SUPPRESSIONS,
    ("model", "bsd_cfg", "fusion"): BSD_FUSIONS,
    ("model", "text", "kind"): TEXT_KINDS,
    ("model", "text", "pooling"): POOLINGS,
    ("model", "image", "layer_type"): ("basic", "bottleneck"),
    ("optim", "schedule"): SCHEDULES,
    ("optim", "name"): OPTIMIZERS,
}


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _resolve_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p.resolve()
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"unknown config {name_or_path!r}: not a file, and not one of {available_configs()}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    import yaml

    if path in seen:
        raise ConfigError(f"config {path}: circular `base` chain {[str(p) for p in seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = _resolve_path(base if not str(base).endswith((".yaml", ".yml")) else path.parent / base)
    return _deep_merge(_read_yaml(base_path, seen + (path,)), data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "config_overrides":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is set both as a value and as a section")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = _deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return nested


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = get_origin(typ)
    if typ is Any:
        return value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(typ, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(typ)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from exc
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key {key!r} (allowed here: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _validate(cfg: SSJDNConfig) -> None:
    for path, allowed in _CHOICES.items():
        node: Any = cfg
        for p in path:
            node = getattr(node, p)
        if node not in allowed:
            raise ConfigError(f"{'.'.join(path)} = {node!r}: must be one of {allowed}")
    m = cfg.model
    if len(m.image.out_features) < 1:
        raise ConfigError("model.image.out_features: at least one stage is needed")
    if m.bsd and len(m.image.out_features) < 2:
        raise ConfigError("model.bsd needs at least two scales in model.image.out_features")
    if m.width % m.lsd_cfg.heads:
        raise ConfigError(f"model.width={m.width} must be divisible by model.lsd_cfg.heads={m.lsd_cfg.heads}")
    if not 0.0 < m.bsd_cfg.suppression_init < 1.0:
        raise ConfigError("model.bsd_cfg.suppression_init must lie in (0, 1)")
    if m.bsd_cfg.scale_loss_weight < 0:
        raise ConfigError("model.bsd_cfg.scale_loss_weight must be >= 0")
    if cfg.loss.name in ("stl", "stl_nce") and cfg.loss.stl.agreement == "posterior" and not m.lsd:
        raise ConfigError("loss.stl.agreement=posterior needs model.lsd=true (the posteriors come from LSD)")
    if cfg.loss.stl.relief < 0:
        raise ConfigError("loss.stl.relief must be >= 0")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be >= 2 (in-batch negatives)")


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> SSJDNConfig:
    """Build and validate a config from plain data; errors name the offending key and `source`."""
    try:
        cfg = _build(SSJDNConfig, dict(data), "")
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def config_to_dict(cfg: SSJDNConfig) -> dict[str, Any]:
    """Plain data (dicts, lists, str, numbers, bools): safe for YAML, JSON and `torch.load(weights_only=True)`."""
    return dataclasses.asdict(cfg)


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> SSJDNConfig:
    """Load a named config (`ssjdn/configs/NAME.yaml`) or a YAML path, then apply `overrides`."""
    path = _resolve_path(name_or_path)
    data = _read_yaml(path)
    cfg = config_from_dict(data, source=f"config {path}")
    if overrides:
        merged = _deep_merge(config_to_dict(cfg), _dotted_to_nested(overrides))
        cfg = config_from_dict(merged, source=f"overrides {sorted(overrides)} on config {path}")
    return cfg


def apply_overrides(cfg: SSJDNConfig, overrides: dict[str, Any]) -> SSJDNConfig:
    """A new config with dotted-key overrides applied (the input is not modified)."""
    merged = _deep_merge(config_to_dict(cfg), _dotted_to_nested(overrides))
    return config_from_dict(merged, source=f"overrides {sorted(overrides)}")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is parsed as YAML (so `false`, `3`, `[1, 2]` work)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)
