"""The run configuration of `nflux train`: defaults, validation, and the model it names.

`make_config(overrides)` checks keys and values; `resolve_for_data(config, kind)` fills the
defaults that depend on the kind of data (vector or image); `model_kwargs` and `build_model`
turn a config into a flow: the vector families over D features, or, on image data,
`nflux.RealNVP.image` / `nflux.Glow.image` over (C, H, W).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

import nflux

__all__ = ["DEFAULTS", "IMAGE_MODELS", "KIND_DEFAULTS", "MODELS", "PRECISIONS", "RECORD_KEYS", "ConfigError",
           "build_model", "check_device", "default_out", "make_config", "model_kwargs", "resolve_for_data"]


class ConfigError(ValueError):
    """A training configuration that cannot be used (unknown model, bad value, image data...)."""


# name -> (class name in nflux, extra constructor kwargs)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "nice": ("NICE", {}),
    "realnvp": ("RealNVP", {}),
    "glow": ("Glow", {}),
    "maf": ("MAF", {}),
    "iaf": ("IAF", {}),
    "nsf": ("NSF", {}),
    "nsf-ar": ("NSF", {"autoregressive": True}),
}

# Models with a multi-scale image variant (`nflux.<Class>.image`), and its default size for
# the command: small enough to train on 8x8 digits in a minute or two on 2 CPU cores.
IMAGE_MODELS: dict[str, dict[str, Any]] = {
    "glow": {"levels": 2, "steps": 4, "hidden": 64},
    "realnvp": {"levels": 2, "hidden": 32, "blocks": 1},
}

# Defaults that depend on the kind of data ("vector": toy and tabular; "image").
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "vector": {"steps": 4000, "batch": 256},
    "image": {"steps": 1500, "batch": 64},
}

DEFAULTS: dict[str, Any] = {
    "model": "nsf",
    "data": "moons",
    "data_root": None,       # directory of the UCI benchmark files
    "steps": None,           # None: KIND_DEFAULTS
    "batch": None,           # the global batch (split across processes under torchrun)
    "lr": 1e-3,
    "weight_decay": 0.0,
    "grad_clip": 5.0,
    "layers": None,          # None: the model's default
    "hidden": None,          # list of ints; None: the model's default
    "bins": None,            # NSF only
    "scales": None,          # image models: levels of the multi-scale architecture
    "seed": 0,
    "device": "cpu",
    "out": None,
    "val_every": 100,
    "checkpoint_every": 250,
    "log_every": 100,
    "patience": 10,          # validations without improvement before stopping; 0: never stop early
    "max_nonfinite": 50,
    "eval_batch": 4096,
    "plot_samples": 2000,
    "compile": False,        # False, or a torch.compile backend ("inductor") for the training loss
    "precision": "32",       # "32", or "bf16": the training loss under torch.autocast (see PRECISIONS)
    "stop_after": None,      # stop (checkpointed) after this step, as if interrupted; for tests
}


# Training precisions: "bf16" runs the training loss under torch.autocast in bfloat16, so the
# conditioner networks' GEMMs and convolutions use AMX / tensor cores while every flow transform,
# log-determinant and the loss stay float32 (nflux.ops' autocast policy). Validation, test
# metrics and samples are float32 either way.
PRECISIONS = ("32", "bf16")

# Keys the trainer adds to the config it records in config.json (not settable).
RECORD_KEYS = ("standardizer", "levels", "model_kwargs", "dataset", "nflux_version", "processes")


def _check_int(config: dict, key: str, minimum: int, allow_none: bool = False) -> None:
    v = config[key]
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{key} must be an int >= {minimum}, got {v!r}")


def make_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS updated with `overrides` (keys checked), validated."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULTS) - set(RECORD_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(DEFAULTS)}")
    config = {**DEFAULTS, **{k: v for k, v in overrides.items() if k not in RECORD_KEYS}}
    config["model"] = str(config["model"]).lower()
    if config["model"] not in MODELS:
        raise ConfigError(f"unknown model {config['model']!r}; choose from {', '.join(MODELS)}")
    for key, minimum in (("seed", 0), ("val_every", 1), ("checkpoint_every", 1),
                         ("log_every", 1), ("patience", 0), ("max_nonfinite", 1), ("eval_batch", 1),
                         ("plot_samples", 0)):
        _check_int(config, key, minimum)
    for key in ("steps", "batch", "layers", "bins", "scales", "stop_after"):
        _check_int(config, key, 1, allow_none=True)
    for key in ("lr", "weight_decay", "grad_clip"):
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                key == "lr" and v == 0):
            raise ConfigError(f"{key} must be a {'positive' if key == 'lr' else 'non-negative'} number, got {v!r}")
    if config["compile"] is True:
        config["compile"] = "inductor"
    if not (config["compile"] is False or isinstance(config["compile"], str) and config["compile"]):
        raise ConfigError(f"compile must be false, true or a torch.compile backend name, got {config['compile']!r}")
    if config["compile"]:
        _check_backend(config["compile"])
    config["precision"] = str(config["precision"])
    if config["precision"] not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {config['precision']!r}")
    if config["hidden"] is not None:
        h = config["hidden"]
        if isinstance(h, int):
            h = [h]
        if not isinstance(h, (list, tuple)) or not h or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in h):
            raise ConfigError(f"hidden must be a list of positive ints, got {config['hidden']!r}")
        config["hidden"] = list(h)
    if config["scales"] is not None and config["model"] not in IMAGE_MODELS:
        raise ConfigError(f"scales applies to image models ({', '.join(IMAGE_MODELS)}), not {config['model']}")
    if config["bins"] is not None and not config["model"].startswith("nsf"):
        raise ConfigError(f"bins applies to nsf and nsf-ar only, not {config['model']}")
    config["device"] = check_device(config["device"])
    for key in ("out", "data_root"):
        if config.get(key) is not None and not isinstance(config[key], (str, os.PathLike)):
            raise ConfigError(f"{key} must be a path (a string), got {config[key]!r}")
    if config["out"] is None:
        config["out"] = default_out(config["model"], config["data"])
    config["out"] = os.fspath(config["out"])
    return config


def _check_backend(name: str) -> None:
    """Refuse an unknown torch.compile backend now, before the run writes anything (torch
    would raise only at the first step)."""
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):  # debug backends (eager) too
        hint = " (to turn compiling off, write false without quotes)" if name.lower() in ("false", "none") else ""
        common = sorted({*torch._dynamo.list_backends(), "eager", "aot_eager"})
        raise ConfigError(f"unknown torch.compile backend {name!r}{hint}; choose e.g. {', '.join(common)} "
                          "(torch._dynamo.list_backends())")


def check_device(device: Any) -> str:
    """`device` as a string, checked: cpu, or cuda[:N] with such a CUDA device present. cpu:N
    is cpu (there is one CPU device; safetensors refuses an index on it)."""
    device = str(device)
    try:
        d = torch.device(device)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda[:N], got {device!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but torch sees no CUDA device")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return "cpu" if d.type == "cpu" else device


def default_out(model: str, data: Any) -> str:
    """The run directory of `model` on `data` when no out is given: runs/<model>-<data's base
    name>, with characters other than letters, digits and -_. replaced by _."""
    base = os.path.basename(os.path.normpath(str(data)))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "data"
    return os.path.join("runs", f"{str(model).lower()}-{safe}")


def resolve_for_data(config: dict[str, Any], kind: str) -> dict[str, Any]:
    """`config` with the KIND_DEFAULTS of `kind` ("toy", "tabular" or "image") filled in,
    checked against the data: image data need an image model, and vector data no `scales`."""
    image = kind == "image"
    if image and config["model"] not in IMAGE_MODELS:
        raise ConfigError(f"dataset {config['data']!r} is an image set: choose an image model "
                          f"({', '.join(IMAGE_MODELS)}), not {config['model']}")
    if not image and config["scales"] is not None:
        raise ConfigError("scales applies to image data only")
    defaults = KIND_DEFAULTS["image" if image else "vector"]
    return {**config, **{k: v for k, v in defaults.items() if config[k] is None}}


def model_kwargs(config: dict[str, Any], shape: Sequence[int] | None = None, levels: int | None = None
                 ) -> dict[str, Any]:
    """Constructor arguments of the run's model; for image data pass the image `shape` and its
    intensity `levels`: then `--layers` is Glow's steps per scale or RealNVP's residual blocks
    per conditioner, `--hidden` the conditioners' channels and `--scales` the levels."""
    if shape is not None and len(shape) == 3:
        name = config["model"]
        kwargs = {"image": True, **IMAGE_MODELS[name], "data_levels": int(levels)}
        if config.get("scales") is not None:
            kwargs["levels"] = config["scales"]
        if config.get("layers") is not None:
            kwargs["steps" if name == "glow" else "blocks"] = config["layers"]
        if config.get("hidden") is not None:
            if len(config["hidden"]) != 1:
                raise ConfigError(f"image models take one --hidden width (conv channels), got {config['hidden']}")
            kwargs["hidden"] = config["hidden"][0]
        return kwargs
    kwargs = dict(MODELS[config["model"]][1])
    if config.get("layers") is not None:
        kwargs["layers"] = config["layers"]
    if config.get("hidden") is not None:
        kwargs["hidden"] = list(config["hidden"])
    if config.get("bins") is not None:
        kwargs["bins"] = config["bins"]
    return kwargs


def build_model(name: str, shape: int | Sequence[int], **kwargs) -> nflux.Flow:
    """The flow `name` (a key of MODELS) over `shape`: D features, or with `image=True` in
    kwargs (from `model_kwargs`) the image variant over (C, H, W)."""
    name = name.lower()
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    cls_name, extra = MODELS[name]
    try:
        if kwargs.pop("image", False):
            return getattr(nflux, cls_name).image(tuple(shape), **kwargs)
        features = shape if isinstance(shape, int) else int(shape[0])
        kw = {**extra, **kwargs}
        if "hidden" in kw:
            kw["hidden"] = tuple(kw["hidden"])
        return getattr(nflux, cls_name)(features, **kw)
    except ValueError as e:  # e.g. H, W not divisible by 2**levels; one feature for a coupling
        raise ConfigError(str(e).removeprefix("nflux: ")) from None


