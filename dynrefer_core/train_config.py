"""The training configuration: one dataclass per section of the YAML file (see configs/mini.yaml).

    seed, out_dir
    data:  DataConfig        the annotation file, its splits, how to generate it, sampling ratios
    model: ModelConfig       a `DynReferConfig` preset, overrides of its fields, the tokenizer's size
    train: TrainLoopConfig   steps, schedule, optimiser, logging, evaluation, the from-scratch probes

`load_config` reads the YAML file and applies `--set section.key=value` overrides (values parsed as YAML).
Unknown keys are refused, naming them and the known ones, and every value is checked against its field's
type, so a typo fails when the run starts rather than hours into it.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import DynReferConfig


@dataclass
class GenerateConfig:
    """How to generate the benchmark when `data.annotations` does not exist (`dynrefer_core.data.generate`)."""

    seed: int
    num_images: int
    split: str = "all"
    workers: int = 1

    def __post_init__(self) -> None:
        _check_types(self)


@dataclass
class DataConfig:
    annotations: str | None = None  # the COCO-style annotation file (spec §5.3)
    generate: GenerateConfig | None = None
    tag_list: str | None = None
    image_root: str | None = None
    train_split: str = "train"
    val_split: str | None = "val"  # None or "": no evaluation during training
    num_workers: int = 0
    class_prompt_ratio: float = 0.0  # `RegionDataset`
    phash_view_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self)


@dataclass
class ModelConfig:
    preset: str = "mini"  # a `DynReferConfig` class method: mini, tiny, official_flant5xl
    overrides: dict[str, Any] = field(default_factory=dict)  # `DynReferConfig` fields, nested like to_dict()
    tokenizer_vocab_size: int | None = None  # None: language.vocab_size

    def __post_init__(self) -> None:
        _check_types(self)

    def dynrefer_config(self) -> DynReferConfig:
        """The preset with `overrides` merged in, nested sections (`language`, ...) key by key."""
        preset = getattr(DynReferConfig, self.preset, None)
        if preset is None:
            raise ValueError(f"model.preset {self.preset!r} is not a DynReferConfig preset (mini, tiny, ...)")
        return DynReferConfig.from_dict(_merge(preset().to_dict(), self.overrides))


@dataclass
class TrainLoopConfig:
    max_steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    threads: int | None = None
    log_every: int = 10
    eval_every: int = 500  # 0: never
    save_every: int = 500
    val_regions: int = 256
    val_meteor: bool = False
    calibrate_tag_threshold: bool = False
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on the CPU (`runtime.choose_dtype`)
    device: str | None = None
    # Training from scratch (`dynrefer_core.scratch_probes`).
    encoder_warmup_steps: int = 0
    encoder_warmup_lr: float = 5e-4
    encoder_warmup_context_probe: bool = False
    encoder_object_probe_weight: float = 0.0
    encoder_probe_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self)


@dataclass
class TrainConfig:
    seed: int = 0
    out_dir: str = "runs/dynrefer"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)

    def __post_init__(self) -> None:
        _check_types(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The config from nested dicts (a YAML file's content); missing keys keep their defaults."""
        return typed_config(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Nested dicts in field order: what `train_config.yaml` and the trainer state hold."""
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, sets: typing.Sequence[str] = ()) -> TrainConfig:
    """The YAML file (None: all defaults), then `--set a.b=value` overrides, each value parsed as YAML."""
    return load_typed_config(TrainConfig, path, sets)


def load_typed_config(cls: type, path: str | Path | None, sets: typing.Sequence[str] = ()):
    """A config dataclass `cls` from a YAML file (None: all defaults) and `--set a.b=value` overrides (each
    value parsed as YAML); unknown keys and values of the wrong type are refused, naming them."""
    data = (yaml.safe_load(Path(path).read_text()) if path else None) or {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for name in parents:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[leaf] = yaml.safe_load(value)
    return typed_config(cls, data)


def typed_config(cls: type, data: dict[str, Any]):
    """`cls` (a config dataclass) from nested dicts; unknown keys and values of the wrong type are refused."""
    unknown = _unknown_keys(cls, data, "")
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {', '.join(_known_keys(cls, ''))}")
    return _typed(data, cls, "")


# ------------------------------------------------------------------------------------------ checks


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_keys(cls: type, data: Any, prefix: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    out = []
    for key, value in data.items():
        hint = _hints(cls).get(key)
        if hint is None:
            out.append(prefix + str(key))
        elif _section(hint) is not None:
            out += _unknown_keys(_section(hint), value, f"{prefix}{key}.")
    return out


def _known_keys(cls: type, prefix: str) -> list[str]:
    out = []
    for name, hint in _hints(cls).items():
        out += _known_keys(_section(hint), f"{prefix}{name}.") if _section(hint) else [prefix + name]
    return out


def _section(hint: Any) -> type | None:
    """The dataclass a field holds (also inside `X | None`), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _check_types(section: Any) -> None:
    """Check (and normalise) every field of a config dataclass against its annotation."""
    for f in dataclasses.fields(section):
        setattr(section, f.name, _typed(getattr(section, f.name), _hints(type(section))[f.name], f.name))


def _typed(value: Any, hint: Any, name: str) -> Any:
    """`value` as the annotated type, or a ValueError naming `name`. Floats also accept numeric strings,
    because YAML reads 1e-4 (without a dot) as a string."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _typed(value, next(a for a in args if a is not type(None)), name)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name or 'the config'} must be a mapping of {hint.__name__} fields, got {value!r}")
        missing = [f.name for f in dataclasses.fields(hint) if f.name not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{name} lacks {missing}")
        return hint(**{k: _typed(v, _hints(hint)[k], f"{name}.{k}" if name else k) for k, v in value.items()})
    if hint is Any:
        return value
    if hint is bool or hint is int or hint is str:
        if type(value) is not hint:
            raise ValueError(f"{name} must be {hint.__name__}, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name} must be a number, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_typed(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return value
    raise TypeError(f"{name}: no check for the annotation {hint!r}")
