"""Typed view of ``params.yaml``: the single source of truth for every knob.

Each top-level group is a frozen dataclass. :func:`load_params` parses the YAML once, checks every
value against the dataclass field types (naming the dotted key and the expected type on a mismatch),
and rejects unknown keys, so a typo in ``dvc exp run -S`` fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """A value in params.yaml has the wrong type, an unknown key, or an impossible value."""


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class PhantomParams:
    n_cases: int = 12
    ape_fraction: float = 0.5
    shape: tuple[int, int, int] = (48, 64, 64)  # thin series [slices, rows, cols]
    pixel_mm: float = 5.0
    thin_mm: float = 1.0
    thick_mm: float = 5.0
    noise_hu: float = 12.0

    def __post_init__(self) -> None:
        _require(self.n_cases >= 1, "data.phantom.n_cases", "must be >= 1")
        _require(0.0 <= self.ape_fraction <= 1.0, "data.phantom.ape_fraction", "must be in [0, 1]")
        _require(all(s >= 4 for s in self.shape), "data.phantom.shape", "every size must be >= 4")
        _require(self.pixel_mm > 0 and self.thin_mm > 0, "data.phantom", "spacings must be > 0")
        _require(self.thick_mm >= self.thin_mm, "data.phantom.thick_mm", "must be >= thin_mm")
        _require(self.noise_hu >= 0, "data.phantom.noise_hu", "must be >= 0")


@dataclass(frozen=True)
class HfDataParams:
    repo: str = "t2ance/APE-data"
    revision: str = "main"
    allow_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataParams:
    source: Literal["phantom", "hf", "local"] = "phantom"
    phantom: PhantomParams = field(default_factory=PhantomParams)
    hf: HfDataParams = field(default_factory=HfDataParams)
    local_dir: str = ""

    def __post_init__(self) -> None:
        if self.source == "local":
            _require(bool(self.local_dir), "data.local_dir", "must name a folder when data.source=local")


# ---------------------------------------------------------------------------------------- preprocess
@dataclass(frozen=True)
class SplitParams:
    train: float = 0.6
    val: float = 0.2
    test: float = 0.2

    def __post_init__(self) -> None:
        fractions = (self.train, self.val, self.test)
        _require(all(f >= 0 for f in fractions), "preprocess.split", "fractions must be >= 0")
        _require(abs(sum(fractions) - 1.0) < 1e-6, "preprocess.split", f"fractions must sum to 1, got {sum(fractions)}")


@dataclass(frozen=True)
class PreprocessParams:
    spacing_mm: tuple[float, ...] = ()  # [sx, sy, sz]; empty = keep series 2's spacing
    shape: tuple[int, ...] = ()  # [D, H, W]; empty = keep
    interpolator: Literal["linear", "bspline", "nearest"] = "linear"
    min_slices: int = 5
    allow_gaps: bool = False
    split: SplitParams = field(default_factory=SplitParams)
    workers: int = 0  # 0 = os.cpu_count()
    min_cases: int = 3
    max_zip_members: int = 20000
    max_unzipped_gb: float = 8.0

    def __post_init__(self) -> None:
        _require(len(self.spacing_mm) in (0, 3), "preprocess.spacing_mm", "must be [] or [sx, sy, sz]")
        _require(all(s > 0 for s in self.spacing_mm), "preprocess.spacing_mm", "must be > 0")
        _require(len(self.shape) in (0, 3), "preprocess.shape", "must be [] or [D, H, W]")
        _require(all(s > 0 for s in self.shape), "preprocess.shape", "must be > 0")
        _require(self.min_slices >= 2, "preprocess.min_slices", "must be >= 2")
        _require(self.workers >= 0, "preprocess.workers", "must be >= 0 (0 = all cores)")
        _require(self.min_cases >= 1, "preprocess.min_cases", "must be >= 1")

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


# ------------------------------------------------------------------------------------------- all
@dataclass(frozen=True)
class Params:
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)


DEFAULT_PARAMS_PATH = Path("params.yaml")


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS_PATH) -> Params:
    """Parse ``params.yaml`` into :class:`Params`; raises :class:`ParamsError` naming the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ParamsError(f"{path} not found: run stages from the repository root") from exc
    return params_from_dict(raw)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Build :class:`Params` from a plain dict (the parsed YAML); missing keys take defaults."""
    return _build(Params, raw, "")


def to_dict(obj: Any) -> Any:
    """Plain (YAML/JSON-able) form of a params dataclass: tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------- parsing
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"params.yaml: {key} {message}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = prefix or "top level"
        raise ParamsError(f"params.yaml: unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    kwargs = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in raw}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"params.yaml: {key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(errors[-1] if errors else f"params.yaml: {key} has an invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params.yaml: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamsError(f"params.yaml: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params.yaml: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params.yaml: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads "1e-4" (no dot) as a string; accept it as the number the user meant.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params.yaml: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"params.yaml: {key} must be a string, got {value!r}")
        return value
    raise ParamsError(f"params.yaml: {key} has an unsupported type {tp}")  # a bug in this module
