"""One plan for a training run: preprocessing, GAN, pseudo-mask rule, segmenters and the run itself.

A plan is read from a TOML file (standard library ``tomllib`` on Python >= 3.11, the ``tomli``
backport before), validated on load, and can be changed with ``--set section.key=value`` overrides
whose values are TOML values (``--set gan.iterations=30``, ``--set preprocess.grid=[64,64,16]``;
a bare word such as ``--set run.device=cpu`` is taken as a string). Named plans ship with the
library in ``CovidGANSegLib/plans/`` (``paper``, ``quick``, ``tiny``); a plan file may start from
one with ``base = "quick"``. Sections and their keys:

* ``[preprocess]``: the fields of :class:`~CovidGANSegLib.config.PreprocessConfig`. Its ``grid``
  is the GAN's model grid (the one place where it is set).
* ``[gan]``: ``config`` (the registry configuration it starts from: paper, quick, tiny) and any
  field of :class:`~CovidGANSegLib.gan.networks.GANConfig` (``iterations``, ``batch_size``...).
* ``[pseudo_masks]``: ``rule`` (refined or paper), ``k``, ``floor``, ``min_size`` (the paper rule).
* ``[segmenter]``: ``models`` (transunet and / or unet), ``config`` (paper, small, tiny), ``grid``
  (the segmenter's model grid, on which the pseudo-masks are written; absent: the GAN's), any
  field of :class:`~CovidGANSegLib.seg.transunet.SegConfig`, and the sub-table
  ``[segmenter.synthetic]`` with the fields of :class:`~CovidGANSegLib.seg.synthetic.SyntheticSupervision`;
  a sub-table named after a model (``[segmenter.unet]``) sets that model's ``iterations`` apart from the others'.
* ``[run]``: ``seed``, ``device`` (auto, cpu, cuda[:N]) and ``deterministic``.

Every error (unknown section or key, a value of the wrong type or out of range, a malformed
``--set``) is an :class:`~CovidGANSegLib.errors.InputError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from CovidGANSegLib.config import PreprocessConfig
from CovidGANSegLib.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib  # novermin
else:  # pragma: no cover - Python 3.9 / 3.10 (Slicer 5.6 / 5.8)
    import tomli as tomllib

#: folder of the named plans shipped with the library
PLANS_DIR = Path(__file__).resolve().parent / "plans"
SECTIONS = ("preprocess", "gan", "pseudo_masks", "segmenter", "run")
PSEUDO_MASK_RULES = ("refined", "paper")
SEG_MODELS = ("transunet", "unet")
#: keys that would set one thing in two places: where to set it instead
_MOVED = {
    ("gan", "grid"): "the GAN's grid is preprocess.grid",
    ("gan", "name"): "set gan.config (the configuration the GAN starts from)",
    ("segmenter", "name"): "set segmenter.config (the configuration the segmenter starts from)",
    ("segmenter", "image_size"): "the segmenter's slice size follows segmenter.grid",
    ("pseudo_masks", "grid"): "the pseudo-masks are written on segmenter.grid",
}
#: the sub-tables of a section: the synthetic-lesion supervision and each model's own iterations
_SUB_TABLES = ("segmenter.synthetic", *(f"segmenter.{m}" for m in SEG_MODELS))
_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")


@dataclass(frozen=True)
class PseudoMaskPlan:
    """How GAN difference maps become pseudo-masks (``gan.pseudomasks.make_pseudo_masks``)."""

    rule: str = "refined"
    k: float = 5.0
    floor: float = 0.05
    min_size: int = 5

    def __post_init__(self) -> None:
        if self.rule not in PSEUDO_MASK_RULES:
            raise ValueError(f"rule must be one of {PSEUDO_MASK_RULES}, got {self.rule!r}")
        if self.k < 0 or self.floor < 0 or self.min_size < 0:
            raise ValueError("k, floor and min_size must be >= 0")


@dataclass(frozen=True)
class RunPlan:
    """Seed, device and determinism of the run."""

    seed: int = 0
    device: str = "auto"
    deterministic: bool = False

    def __post_init__(self) -> None:
        from CovidGANSegLib import protocol

        protocol.check_device(self.device)


@dataclass(frozen=True)
class SegmenterPlan:
    """Which segmenters, their configuration, their grid and their synthetic-lesion supervision."""

    models: tuple[str, ...]
    config: Any  # SegConfig (torch is imported only when a plan is built)
    synthetic: Any  # SyntheticSupervision
    grid: tuple[int, int, int] | None = None
    #: ``(model, iterations)`` for the models that train for other than ``config.iterations``
    iterations_by_model: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.models or len(set(self.models)) != len(self.models) or any(m not in SEG_MODELS for m in self.models):
            raise ValueError(f"models must be distinct names among {list(SEG_MODELS)}, got {list(self.models)}")
        if self.grid is not None and (len(self.grid) != 3 or min(self.grid) < 4):
            raise ValueError(f"grid must be three sizes of at least 4 voxels, got {list(self.grid)}")
        for model, iterations in self.iterations_by_model:
            if model not in SEG_MODELS or not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
                raise ValueError(f"iterations of {model!r} must be a whole number >= 1 for one of {list(SEG_MODELS)}, got {iterations!r}")

    def iterations_of(self, model: str) -> int:
        """The training iterations of ``model``: its own sub-table's, else ``config.iterations``."""
        return dict(self.iterations_by_model).get(model, self.config.iterations)

    def config_for(self, model: str) -> Any:
        """``config`` with ``model``'s iterations."""
        iterations = self.iterations_of(model)
        return self.config if iterations == self.config.iterations else self.config.replace(iterations=iterations)


@dataclass(frozen=True)
class Plan:
    """The effective plan of a training run (see the module docstring)."""

    preprocess: PreprocessConfig
    gan: Any  # GANConfig
    pseudo_masks: PseudoMaskPlan
    segmenter: SegmenterPlan
    run: RunPlan
    name: str = field(default="custom", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON- and TOML-ready data (lists, no None); :func:`plan_from_dict` reads it back."""
        gan = _plain(self.gan.to_dict())
        gan = {"config": gan.pop("name"), **{k: v for k, v in gan.items() if k != "grid"}}
        seg = _plain(self.segmenter.config.to_dict())
        seg = {k: v for k, v in seg.items() if k not in ("name", "image_size")}
        segmenter: dict[str, Any] = {"models": list(self.segmenter.models), "config": self.segmenter.config.name}
        if self.segmenter.grid is not None:
            segmenter["grid"] = list(self.segmenter.grid)
        segmenter.update(seg)
        segmenter["synthetic"] = _plain(dataclasses.asdict(self.segmenter.synthetic))
        for model, iterations in self.segmenter.iterations_by_model:
            segmenter[model] = {"iterations": iterations}
        return {
            "preprocess": _plain(self.preprocess.to_dict()),
            "gan": gan,
            "pseudo_masks": _plain(dataclasses.asdict(self.pseudo_masks)),
            "segmenter": segmenter,
            "run": _plain(dataclasses.asdict(self.run)),
        }

    def hash(self, *sections: str) -> str:
        """SHA-256 of the plan (or of some sections) in a canonical JSON form."""
        return plan_hash(self.to_dict(), *sections)

    def to_toml(self) -> str:
        """The plan as a TOML document (loads back to an equal plan)."""
        return dump_toml(self.to_dict(), header=f"CovidGANSeg effective training plan (from {self.name!r})")


def _plain(data: Any) -> Any:
    """Tuples become lists, recursively (TOML and JSON have only arrays)."""
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data


def plan_hash(data: dict[str, Any], *sections: str) -> str:
    """SHA-256 of a plan dict (restricted to ``sections`` when given), canonical JSON."""
    part = {k: data[k] for k in sections} if sections else data
    text = json.dumps(part, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------
# reading


def named_plans() -> list[str]:
    """Names of the plans shipped with the library."""
    return sorted(p.stem for p in PLANS_DIR.glob("*.toml"))


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if text in named_plans():
        return PLANS_DIR / f"{text}.toml"
    path = Path(text)
    if path.suffix.lower() != ".toml" and not path.exists():
        raise InputError(f"unknown plan {text!r}: use one of {named_plans()} or a .toml file")
    if not path.is_file():
        raise InputError("plan file not found" if not path.exists() else "the plan is not a file", path)
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"not a valid TOML plan ({exc})", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the plan ({exc})", path) from exc


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The plan file and the files it is based on, base first."""
    if path.resolve() in seen:
        raise InputError("the plan's base chain loops back to itself", path)
    data = _read_toml(path)
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise InputError(f"base: must be the name of a shipped plan {named_plans()}, got {base!r}", path)
    if base not in named_plans():
        raise InputError(f"base: unknown plan {base!r}, use one of {named_plans()}", path)
    return [*_layers(PLANS_DIR / f"{base}.toml", (*seen, path.resolve())), (path, data)]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"section.key=value"`` -> ``(["section", "key"], value)``; the value is parsed as TOML.

    Raises:
        InputError: no ``=``, an empty key, or a value that is neither TOML nor a bare word.
    """
    key, sep, raw = str(text).partition("=")
    key, raw = key.strip(), raw.strip()
    parts = key.split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise InputError(f"--set {text!r}: expected section.key=value, e.g. gan.iterations=30")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        if not _BARE_WORD.match(raw):
            raise InputError(f"--set {text!r}: the value {raw!r} is not a TOML value (quote strings, lists as [1, 2, 3])") from None
        value = raw
    return parts, value


def _merge(target: dict[str, Any], source: dict[str, Any], where: str, origin: str | Path | None) -> None:
    """Deep-merge ``source`` into ``target`` (sections and the one sub-table); check section names."""
    for key, value in source.items():
        name = f"{where}.{key}" if where else key
        if not where and key not in SECTIONS:
            raise InputError(f"unknown section [{key}] (sections: {', '.join(SECTIONS)})", origin)
        if not where and not isinstance(value, dict):
            raise InputError(f"[{key}] must be a table of keys, got {value!r}", origin)
        if isinstance(value, dict) and (not where or name in _SUB_TABLES):
            sub = target.setdefault(key, {})
            if not isinstance(sub, dict):
                raise InputError(f"{name} must be a table", origin)
            _merge(sub, value, name, origin)
        else:
            target[key] = value


def load_plan(name_or_path: str | Path = "paper", overrides: Sequence[str] = ()) -> Plan:
    """A validated plan: a shipped plan's name or a TOML file, then ``--set`` overrides.

    Raises:
        InputError: unknown plan or file, invalid TOML, unknown section or key, a bad value
            (the message names the file or the ``--set`` and the key).
    """
    path = _resolve(name_or_path)
    data: dict[str, Any] = {}
    for origin, layer in _layers(path):
        _merge(data, layer, "", origin)
    sources: dict[tuple[str, ...], str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        nested: dict[str, Any] = value
        for part in reversed(parts):
            nested = {part: nested}
        try:
            _merge(data, nested, "", None)
        except InputError as exc:
            raise InputError(f"--set {text!r}: {exc.problem}") from None
        sources[tuple(parts)] = f"--set {text!r}"
    name = str(name_or_path) if str(name_or_path) in named_plans() else Path(name_or_path).name
    return plan_from_dict(data, origin=path, sources=sources, name=name)


def read_plan_file(path: str | Path) -> Plan:
    """Read a plan TOML file (e.g. a run's ``plan.toml``)."""
    return load_plan(Path(path))


# ------------------------------------------------------------------------------------------------
# validation


def _check_value(key: str, value: Any, default: Any, optional: bool = False) -> Any:
    """``value`` converted to the type of ``default`` (ints to floats, lists to tuples), or ValueError."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ValueError(f"must be a list like {list(default)}, got {value!r}")
        kind = type(default[0]) if default else float
        return tuple(_check_value(key, v, kind() if kind is not bool else False) for v in value)
    return value


def _fields(cls: type, data: dict[str, Any], section: str, *, skip: tuple[str, ...] = (), base: Any = None,
            errors: list[str] | None = None) -> dict[str, Any]:
    """Check ``data`` against the fields of dataclass ``cls`` (defaults from ``base`` or the class)."""
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if (section, key) in _MOVED:
            raise _KeyProblem(f"{section}.{key}", f"not a plan key: {_MOVED[(section, key)]}")
        if key not in known:
            raise _KeyProblem(f"{section}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
        default = getattr(base, key) if base is not None else known[key].default
        try:
            out[key] = _check_value(key, value, default)
        except ValueError as exc:
            raise _KeyProblem(f"{section}.{key}", str(exc)) from None
    return out


class _KeyProblem(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def plan_from_dict(data: dict[str, Any], *, origin: str | Path | None = None, sources: dict[tuple[str, ...], str] | None = None,
                   name: str = "custom") -> Plan:
    """Build and validate a :class:`Plan` from plan data (sections of keys).

    Raises:
        InputError: naming ``origin`` (or the ``--set`` that set the key) and the key.
    """
    sources = sources or {}

    def fail(key: str, problem: str) -> InputError:
        parts = tuple(key.split("."))
        for n in range(len(parts), 0, -1):
            if parts[:n] in sources:
                return InputError(f"{sources[parts[:n]]}: {key}: {problem}")
        if len(parts) == 1:  # a check of the whole section: name the --set that touched it, if one did
            touched = [src for k, src in sources.items() if k[:1] == parts]
            if touched:
                return InputError(f"{touched[-1]}: {key}: {problem}")
        return InputError(f"{key}: {problem}", origin)

    current = "plan"
    try:
        from CovidGANSegLib.gan.networks import GAN_CONFIGS, GANConfig
        from CovidGANSegLib.seg.synthetic import SyntheticSupervision
        from CovidGANSegLib.seg.transunet import SEG_CONFIGS, SegConfig

        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise _KeyProblem(sorted(unknown)[0], f"unknown section (sections: {', '.join(SECTIONS)})")
        current = "preprocess"
        pp = PreprocessConfig(**_fields(PreprocessConfig, dict(data.get("preprocess", {})), "preprocess"))

        current = "gan"
        gan_data = dict(data.get("gan", {}))
        base_name = gan_data.pop("config", "paper")
        if base_name not in GAN_CONFIGS:
            raise _KeyProblem("gan.config", f"unknown GAN configuration {base_name!r} (use one of {sorted(GAN_CONFIGS)})")
        gan_base = GAN_CONFIGS[base_name]
        gan = dataclasses.replace(gan_base, **_fields(GANConfig, gan_data, "gan", skip=("name", "grid"), base=gan_base),
                                  grid=tuple(pp.grid))

        current = "pseudo_masks"
        pm = PseudoMaskPlan(**_fields(PseudoMaskPlan, dict(data.get("pseudo_masks", {})), "pseudo_masks"))

        current = "segmenter"
        seg_data = dict(data.get("segmenter", {}))
        models = seg_data.pop("models", ["transunet"])
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise _KeyProblem("segmenter.models", f"must be a list of model names, got {models!r}")
        seg_base_name = seg_data.pop("config", "small")
        if seg_base_name not in SEG_CONFIGS:
            raise _KeyProblem("segmenter.config", f"unknown segmenter configuration {seg_base_name!r} (use one of {sorted(SEG_CONFIGS)})")
        grid = seg_data.pop("grid", None)
        if grid is not None:
            try:
                grid = _check_value("grid", grid, (0, 0, 0))
            except ValueError as exc:
                raise _KeyProblem("segmenter.grid", str(exc)) from None
        iterations_by_model = []
        for model in SEG_MODELS:
            own = seg_data.pop(model, None)
            if own is None:
                continue
            if not isinstance(own, dict):
                raise _KeyProblem(f"segmenter.{model}", f"must be a table (its key: iterations), got {own!r}")
            for key, value in own.items():
                if key != "iterations":
                    raise _KeyProblem(f"segmenter.{model}.{key}", "unknown key (a model's own table sets only iterations)")
                try:
                    iterations = _check_value("iterations", value, 0)
                except ValueError as exc:
                    raise _KeyProblem(f"segmenter.{model}.iterations", str(exc)) from None
                if iterations < 1:
                    raise _KeyProblem(f"segmenter.{model}.iterations", f"must be >= 1, got {iterations}")
                iterations_by_model.append((model, iterations))
        syn_data = seg_data.pop("synthetic", {})
        if not isinstance(syn_data, dict):
            raise _KeyProblem("segmenter.synthetic", "must be a table")
        current = "segmenter.synthetic"
        synthetic = SyntheticSupervision(**_fields(SyntheticSupervision, syn_data, "segmenter.synthetic"))
        current = "segmenter"
        seg_base = SEG_CONFIGS[seg_base_name]
        seg_cfg = dataclasses.replace(seg_base, **_fields(SegConfig, seg_data, "segmenter", skip=("name", "image_size"), base=seg_base))
        segmenter = SegmenterPlan(models=tuple(models), config=seg_cfg, synthetic=synthetic, grid=grid,
                                  iterations_by_model=tuple(iterations_by_model))

        current = "run"
        run = RunPlan(**_fields(RunPlan, dict(data.get("run", {})), "run"))
    except _KeyProblem as exc:
        raise fail(exc.key, exc.problem) from None
    except (ValueError, TypeError) as exc:  # a dataclass's own check (__post_init__)
        message = re.sub(r"^GAN config '[^']*': ", "", str(exc))
        if current == "gan" and message.startswith("grid "):  # the GAN's grid is the preprocessing's
            current, message = "preprocess.grid", message[len("grid "):]
        raise fail(current, message) from None
    return Plan(preprocess=pp, gan=gan, pseudo_masks=pm, segmenter=segmenter, run=run, name=name)


# ------------------------------------------------------------------------------------------------
# writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a plan value must be finite, got {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (JSON escapes are TOML escapes)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: dict[str, Any], header: str = "") -> str:
    """A TOML document of tables of scalars and lists, with nested tables (enough for plans)."""
    lines = [f"# {header}", ""] if header else []

    def table(prefix: str, content: dict[str, Any]) -> None:
        scalars = {k: v for k, v in content.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in content.items() if isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        if prefix or scalars:
            lines.append("")
        for k, v in tables.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines).rstrip() + "\n"
