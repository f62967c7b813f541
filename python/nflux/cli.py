"""The `nflux` command (also `python -m nflux`): train, evaluate and sample flows.

User errors (bad arguments, missing files, unknown dataset or model, corrupt or mismatched
checkpoints) print one line `nflux: error: ...` to stderr and exit with status 2. A training
run stopped by Ctrl-C (SIGINT) or SIGTERM checkpoints, says so in one line and exits with 130.
Under `torchrun ... -m nflux train` every process runs this same command (see
`nflux.training.distributed`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE = """\
examples:
  nflux train nsf --data moons                 # ~1 min on 2 CPU cores; writes runs/nsf-moons/
  nflux train maf --data wine --steps 3000 --hidden 64 64 --out runs/wine
  nflux train nsf --data moons --steps 5000 --resume   # continue from the last checkpoint
  nflux train glow --data digits               # multi-scale Glow on 8x8 digits (bits/dim)
  nflux train glow --data digits --precision bf16   # conditioner networks in bfloat16 (AMX, GPUs)
  torchrun --nproc_per_node=2 -m nflux train nsf --data moons --out runs/ddp   # 2 processes, DDP
  nflux eval runs/nsf-moons                    # test NLL (nats, data units) of the best weights
  nflux sample runs/nsf-moons -n 5000 --out s.npy   # .npy (float32 data units; images: integer levels) or .png
  nflux sample runs/nsf-moons -n 2000 --temperature 0.8 --out s.png
  nflux train glow --data path/to/pngs         # a folder of PNG/JPEG images (8-bit, or 16-bit greyscale)
  nflux datasets                               # registered data sets
  nflux info                                   # version, compiled kernels, CUDA

models: nice, realnvp, glow, maf, iaf, nsf (coupling spline), nsf-ar (autoregressive spline);
on image data (digits, image folders) realnvp and glow are the multi-scale image flows.
A run directory holds config.json (with the data standardiser), metrics.jsonl, metrics.json,
best.safetensors, checkpoints/, samples.png and loss.png.

Ctrl-C finishes the current step, writes a checkpoint and exits with status 130; --resume
continues exactly. Under torchrun, --batch is the global batch, split across the processes.

--temperature T scales the standard deviation of the base Gaussian sample by T before it is
mapped through the flow (T < 1: samples concentrated on high-density regions; T = 1: the
model's distribution).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would also print the usage)
        print(f"nflux: error: {message}", file=sys.stderr)
        sys.exit(2)


def _number(parse, accept, expected: str):
    """An argparse type: parse(text), refused with "expected <expected>" unless accept(value)."""

    def convert(text: str):
        try:
            v = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    return convert


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a positive number")


def build_parser() -> argparse.ArgumentParser:
    from nflux.training.config import DEFAULTS, KIND_DEFAULTS, MODELS, PRECISIONS

    p = _Parser(prog="nflux", description="Normalizing flows on fused C++/CUDA torch operators.",
                epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a flow on a data set", epilog=USAGE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help=f"one of {', '.join(MODELS)} (default {DEFAULTS['model']})")
    t.add_argument("--data", help="data set name (see `nflux datasets`), a .npy/.csv file, or a folder of "
                                  f"PNG/JPEG images (default {DEFAULTS['data']})")
    t.add_argument("--data-root", dest="data_root", help="directory of the UCI benchmark files")
    vec, img = KIND_DEFAULTS["vector"], KIND_DEFAULTS["image"]
    t.add_argument("--steps", type=_positive_int,
                   help=f"optimizer steps (default {vec['steps']}; images {img['steps']})")
    t.add_argument("--batch", type=_positive_int,
                   help=f"global batch size, split across torchrun processes (default {vec['batch']}; "
                        f"images {img['batch']})")
    t.add_argument("--lr", type=_positive_float, help=f"Adam learning rate (default {DEFAULTS['lr']})")
    t.add_argument("--layers", type=_positive_int,
                   help="flow layers (default: the model's); images: glow steps per scale, realnvp residual "
                        "blocks per coupling network")
    t.add_argument("--hidden", type=_positive_int, nargs="+",
                   help="hidden widths, e.g. --hidden 64 64; images: one conv width")
    t.add_argument("--scales", type=_positive_int, help="image models: scales of the multi-scale flow")
    t.add_argument("--bins", type=_positive_int, help="spline bins (nsf, nsf-ar)")
    t.add_argument("--val-every", dest="val_every", type=_positive_int, help="steps between validations")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=_positive_int,
                   help="steps between checkpoints")
    t.add_argument("--log-every", dest="log_every", type=_positive_int, help="steps between log lines")
    t.add_argument("--patience", type=_nonneg_int, help="validations without improvement before stopping (0: off)")
    t.add_argument("--out", help="run directory (default runs/<model>-<data>)")
    t.add_argument("--device", help="cpu or cuda (default cpu)")
    t.add_argument("--seed", type=_nonneg_int, help="seed of the data split, init and batches (default 0)")
    t.add_argument("--threads", type=_nonneg_int, default=1,
                   help="CPU threads for torch (default 1: these networks are too small to gain from "
                        "more, and on a busy machine extra threads mostly wait; 0 keeps torch's choice)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the training step's model with BACKEND (default inductor): "
                        "compile time first, faster steps after")
    t.add_argument("--precision", choices=PRECISIONS,
                   help="32 (default) or bf16: the training step's networks compute in bfloat16 under "
                        "torch.autocast (AMX CPUs, GPUs); the flow transforms, validation and test NLL in float32")
    t.add_argument("--config", help="JSON file of config keys (flags given on the command line win)")
    t.add_argument("--stop-after", dest="stop_after", type=_positive_int,
                   help="stop (checkpointed) after this step, as if interrupted; the schedule still spans --steps")
    t.add_argument("--quiet", action="store_true", help="no progress output")

    e = sub.add_parser("eval", help="test NLL of a trained run")
    e.add_argument("dir", metavar="DIR", help="run directory")
    e.add_argument("--data", help="evaluate on another data set of the same shape")
    e.add_argument("--data-root", dest="data_root",
                   help="directory of the UCI benchmark files (default: the run's own --data-root)")
    e.add_argument("--device", default="cpu")

    s = sub.add_parser("sample", help="draw samples from a trained run", epilog=USAGE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("dir", metavar="DIR", help="run directory")
    s.add_argument("-n", type=_positive_int, default=1000, help="number of samples (default 1000)")
    s.add_argument("--out", help="output .npy (float64 data units; images: integer levels, uint8 when they fit) "
                                 "or .png (images: a grid of the first 64) (default DIR/samples-N.npy)")
    s.add_argument("--temperature", type=_positive_float, default=1.0,
                   help="scale of the base sample's std (default 1.0)")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--device", default="cpu")

    sub.add_parser("datasets", help="list the registered data sets")
    sub.add_parser("info", help="build information: version, kernels, CUDA")
    return p


_TRAIN_KEYS = ("data", "data_root", "steps", "batch", "lr", "layers", "hidden", "bins", "scales", "val_every",
               "checkpoint_every", "log_every", "patience", "out", "device", "seed", "compile", "precision",
               "stop_after")


def _json_object(path: Path, what: str) -> dict:
    """The JSON object in `path`, or a one-line ConfigError naming `what` and the file."""
    from nflux.training.config import ConfigError

    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, got {type(value).__name__}")
    return value


def _cmd_train(args) -> int:
    from nflux.training.config import DEFAULTS, ConfigError, default_out
    from nflux.training.trainer import train

    config: dict = {}
    if args.config:
        path = Path(args.config)
        if path.is_dir():
            raise IsADirectoryError(f"--config {path} is a directory; give a JSON file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        config = _json_object(path, "config file")
    cli = {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k) is not None}
    if args.model is not None:
        cli["model"] = args.model
    if args.resume:
        # The run's own config, then the config file, then the flags.
        out = cli.get("out") or config.get("out")
        if out is None:  # the folder a run without --out writes to (make_config)
            out = default_out(cli.get("model", config.get("model", DEFAULTS["model"])),
                              cli.get("data", config.get("data", DEFAULTS["data"])))
        saved_path = Path(out) / "config.json"
        if saved_path.is_file():
            saved = _json_object(saved_path, "the run's config")
            # make_config drops the recorded keys (standardizer, levels, ...) in train().
            saved = {k: v for k, v in saved.items() if k != "stop_after"}
            config = {**saved, **config}
        config["out"] = out
    config = {**config, **cli}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    metrics = train(config, resume=args.resume, quiet=args.quiet)
    if metrics.get("signal"):
        return 130  # interrupted (SIGINT/SIGTERM), checkpointed: the shell's code for Ctrl-C
    return 0


def _cmd_eval(args) -> int:
    from nflux.training.runs import evaluate
    from nflux.training.trainer import write_json

    result = evaluate(args.dir, data=args.data, device=args.device, data_root=args.data_root)
    path = Path(args.dir) / "eval.json"
    write_json(path, result)
    bpd = f", {result['test_bits_per_dim']:.4f} bits/dim" if "test_bits_per_dim" in result else ""
    print(f"test nll {result['test_nll_nats']:.6f} nats{bpd} on {result['data']} ({result['n_test']} examples); "
          f"wrote {path}")
    return 0


def _cmd_sample(args) -> int:
    import numpy as np

    from nflux.training.plots import GRID_IMAGES, plot_samples
    from nflux.training.runs import sample_run
    from nflux.training.trainer import make_dir

    out = Path(args.out) if args.out else Path(args.dir) / f"samples-{args.n}.npy"
    if out.suffix.lower() not in (".npy", ".png"):
        raise ValueError(f"--out must end in .npy or .png, got {str(out)!r}")
    if out.is_dir():
        raise IsADirectoryError(f"--out {str(out)!r} is a directory; give a .npy or .png file name")
    x, record = sample_run(args.dir, args.n, temperature=args.temperature, seed=args.seed, device=args.device)
    make_dir(out.parent, "--out", out)
    image = x.dim() == 4
    if out.suffix.lower() == ".npy":
        # Images as integer levels in the smallest unsigned type that holds them; vectors in
        # float64, the precision of the data units they were unstandardised to (float32 rounds
        # a column near 2e7 to a 2-unit grid). Written through a file object: np.save appends
        # ".npy" to a name that ends in ".NPY".
        levels = int(record["levels"]) if image else 0
        dtype = (np.uint8 if levels <= 256 else np.uint16 if levels <= 65536 else np.int64) if image else np.float64
        with open(out, "wb") as f:
            np.save(f, x.numpy().astype(dtype))
        what = f"{args.n} samples (" + (f"images {list(x.shape[1:])}, integer levels, {np.dtype(dtype).name}"
                                        if image else f"{x.shape[1]} dims, data units, float64") + ")"
    else:
        plot_samples(None, x, out)
        count = f"the first {GRID_IMAGES} of {args.n}" if args.n > GRID_IMAGES else f"{args.n}"
        what = (f"a grid of {count} samples (images {list(x.shape[1:])})" if image
                else f"a plot of {args.n} samples ({x.shape[1]} dims)")
    print(f"wrote {what} to {out}")
    return 0


def _cmd_datasets(args) -> int:
    from nflux.data import available

    names = available()
    width = max(map(len, names))
    for name, desc in names.items():
        print(f"{name:<{width}}  {desc}")
    print("or a path: a .npy/.csv file (N x D; .npy N x C x H x W: images) or a folder of PNG/JPEG images")
    return 0


def _cmd_info(args) -> int:
    import nflux

    for k, v in nflux.build_info().items():
        print(f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from nflux.data import DatasetError
    from nflux.training.checkpoint import CheckpointError
    from nflux.training.nonfinite import NonFiniteLossError

    commands = {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample, "datasets": _cmd_datasets,
                "info": _cmd_info}
    try:
        return commands[args.command](args)
    except (DatasetError, CheckpointError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            ValueError) as e:
        # The library's own messages start with "nflux: "; the line says it once.
        msg = " ".join(str(e).split()).removeprefix("nflux: ") or type(e).__name__
        print(f"nflux: error: {msg}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"nflux: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Training writes a checkpoint when interrupted, but not before its first step.
        hint = " (--resume continues from the last checkpoint, if one was written)" if args.command == "train" else ""
        print(f"nflux: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
