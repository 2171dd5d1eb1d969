"""Command-line entry points.

- `lightning fit|validate|test|predict -c recipes/<name>.yaml`: a `LightningCLI` over every zoo
  LightningModule and DataModule (subclass mode: the recipe names them by `class_path`).
- `zoo ...`: tools (`zoo hub ...`); `zoo fit ...` (and `python -m zoo fit ...`) is `lightning fit ...`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from zoo import upscale
from zoo.assets import asset_dir
from zoo.hub import MissingExtraError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
CONFIG_FLAGS = ("-c", "--config")


def packaged_recipe(path: str) -> str:
    """`recipes/<x>.yaml` as given when it exists, else the copy installed with the package.

    Lets `lightning fit -c recipes/stream.yaml` work from an install as well as from a checkout.
    """
    if Path(path).exists():
        return path
    parts = Path(path).parts
    if "recipes" not in parts:
        return path
    rel = parts[parts.index("recipes") + 1:]
    packaged = asset_dir("recipes").joinpath(*rel)
    return str(packaged) if packaged.is_file() else path


def _with_packaged_recipes(args: Sequence[str]) -> list[str]:
    args = list(args)
    for i, arg in enumerate(args):
        if arg in CONFIG_FLAGS and i + 1 < len(args):
            args[i + 1] = packaged_recipe(args[i + 1])
        elif arg.startswith("--config="):
            args[i] = "--config=" + packaged_recipe(arg.split("=", 1)[1])
    return args


# Messages of other libraries that say nothing to a zoo user: the recipes freeze modules on purpose
# (eval-mode modules); jsonargparse and torch deprecations come from Lightning's own code, not the recipe.
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r"\s*skip_none parameter was deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips (e.g. for its cloud logger) from its info log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")


def quiet_third_party() -> None:
    """Silence what other libraries print that is not the user's business; real warnings stay."""
    import warnings

    # bitsandbytes (installed with the eval extra) logs about optional CPU kernels when peft imports it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def lightning_main(args: Sequence[str] | None = None) -> None:
    """`lightning fit|validate|test|predict`: LightningCLI over the zoo's modules and datamodules."""
    quiet_third_party()
    try:
        from lightning.pytorch import LightningDataModule, LightningModule
        from lightning.pytorch.cli import LightningCLI
    except ModuleNotFoundError as err:
        raise SystemExit(f"lightning: error: training needs the train extra ({err.name} is not installed): "
                         f"pip install 'vsr-zoo[train]'") from None

    class ZooCLI(LightningCLI):
        """LightningCLI whose recipe mistakes (a missing dataset root, a bad value) end in one sentence."""

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, OSError) as err:
                # jsonargparse wraps a class's own error in its type check: report the innermost one.
                while isinstance(err.__cause__ or err.__context__, (ValueError, OSError)):
                    err = err.__cause__ or err.__context__
                print(f"lightning: error: {err}", file=sys.stderr)
                raise SystemExit(2) from None

        def before_fit(self) -> None:
            # `--ckpt_path last` resumes the newest last.ckpt of the earlier runs: Lightning alone looks only in
            # this run's own, new lightning_logs/version_N, and would silently start from scratch.
            from zoo.components.train.checkpoint import find_last_checkpoint

            config = self.config_init[self.subcommand]
            model = f"{type(self.model).__module__}.{type(self.model).__qualname__}"
            if config.get("ckpt_path") == "last" and (last := find_last_checkpoint(self.trainer, model)) is not None:
                config["ckpt_path"] = str(last)

    # LightningCLI reads sys.argv; the command line is handed over there (with packaged recipe paths
    # resolved) rather than as `args`, which Lightning would flag as given twice.
    sys.argv = [sys.argv[0], *_with_packaged_recipes(sys.argv[1:] if args is None else args)]
    ZooCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lightning"},
    )


# zoo tools --------------------------------------------------------------------------------

def _hub_list(_: argparse.Namespace) -> None:
    from zoo.hub import REGISTRY

    rows = [("name", "paper", "weights", "license")]
    for name, cfg in REGISTRY.items():
        rows.append((name, cfg.paper, cfg.repo_id or "(train with " + cfg.recipe + ")", cfg.license))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _hub_download(ns: argparse.Namespace) -> None:
    from zoo.hub import download

    print(download(ns.name, local_dir=ns.local_dir))


def _hub_export(ns: argparse.Namespace) -> None:
    from zoo.hub import export_checkpoint

    print(export_checkpoint(ns.checkpoint, ns.folder, repo_id=ns.repo_id))


def _hub_push(ns: argparse.Namespace) -> None:
    from zoo.hub import push

    print(push(ns.folder, ns.repo_id, private=ns.private, revision=ns.revision))


def _hub_card(ns: argparse.Namespace) -> None:
    from zoo.hub import render_card

    print(render_card(ns.name, repo_id=ns.repo_id))


def _literal(text: str) -> object:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _key_values(items: list[str], flag: str) -> dict[str, object]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        pairs[key.replace("-", "_")] = _literal(value)
    return pairs


def _read_json(path: Path, flag: str) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag} {path} is not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path} holds no JSON object")
    return data


def _bench(ns: argparse.Namespace) -> None:
    import json

    from zoo.bench import BENCHMARKS, describe, run_benchmark

    if ns.model is not None:
        from zoo.bench.pipeline import bench_pipeline

        settings = {"model": ns.model, "size": ns.size, "height": ns.height, "width": ns.width,
                    "frames": ns.frames, "dtype": ns.dtype, "device": ns.device, "compile": ns.compile,
                    "threads": ns.threads, "busy_ok": ns.busy_ok, "options": _key_values(ns.option, "--option"),
                    "timed": False if ns.count_only else None,
                    "counts": None if ns.counts is None else _read_json(ns.counts, "--counts"),
                    "breakdown": ns.breakdown}
        result = bench_pipeline(**settings)
        if ns.vs:
            changed = _key_values(ns.vs, "--vs")
            other = {**settings, **changed}
            if not set(changed) & {"model", "size", "height", "width", "frames", "dtype", "options"}:
                other["counts"] = result  # the same stream: its count holds (device and compile change none)
            second = bench_pipeline(**other)
            timed = result["timed"] and second["timed"]
            result = {"baseline": result, "vs": second,
                      "speedup": result["ms_per_output_frame"] / second["ms_per_output_frame"] if timed else None,
                      "flops_ratio": second["flops_per_frame"]["total"] / result["flops_per_frame"]["total"],
                      "launches_ratio": second["launches_per_frame"] / result["launches_per_frame"]}
    elif ns.name is None:
        width = max(map(len, BENCHMARKS))
        for name in BENCHMARKS:
            print(f"{name.ljust(width)}  {describe(name)}")
        print("\nzoo bench --model NAME [--size tiny|full ...]: speed, memory and FLOPs of a model's pipeline")
        return
    else:
        result = run_benchmark(ns.name, **_key_values(ns.arg, "--arg"))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if ns.json is not None:
        ns.json.write_text(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The `zoo` argument parser (tools only; Lightning subcommands are dispatched before parsing)."""
    from zoo.evaluate import add_parser as add_evaluate_parser
    from zoo.hub import REGISTRY

    parser = argparse.ArgumentParser(
        prog="zoo",
        description="vsr-zoo tools. Training: `zoo fit -c recipes/<name>.yaml` (same as `lightning fit`).",
        epilog=f"Lightning subcommands: {', '.join(LIGHTNING_SUBCOMMANDS)} (see `zoo fit --help`).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    hub = commands.add_parser("hub", help="list, download, export, push and render model cards")
    hub_commands = hub.add_subparsers(dest="hub_command", required=True, metavar="ACTION")
    names = list(REGISTRY)

    p = hub_commands.add_parser("list", help="the registered models and where their weights live")
    p.set_defaults(run=_hub_list)

    p = hub_commands.add_parser("download", help="download a model's published weights")
    p.add_argument("name", choices=names)
    p.add_argument("--local-dir", type=Path, help="copy the files here instead of the Hub cache only")
    p.set_defaults(run=_hub_download)

    p = hub_commands.add_parser("export", help="turn a training checkpoint into a Hub-ready folder")
    p.add_argument("checkpoint", type=Path, help="a .ckpt written by `lightning fit`")
    p.add_argument("folder", type=Path, help="output folder (safetensors + config.json + README.md)")
    p.add_argument("--repo-id", help="the Hub repo the card should name")
    p.set_defaults(run=_hub_export)

    p = hub_commands.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    p.add_argument("folder", type=Path)
    p.add_argument("repo_id", help="org/name on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to")
    p.set_defaults(run=_hub_push)

    p = hub_commands.add_parser("card", help="print a model's rendered model card")
    p.add_argument("name", choices=names)
    p.add_argument("--repo-id", help="the Hub repo the card should name")
    p.set_defaults(run=_hub_card)

    upscale.add_parser(commands)

    add_evaluate_parser(commands, names)

    p = commands.add_parser("bench", help="speed, memory and FLOPs of a model, or a named benchmark",
                            description="zoo bench NAME runs a registered benchmark (zoo bench lists them); "
                                        "zoo bench --model NAME times a model's pipeline and counts its FLOPs.")
    p.add_argument("name", nargs="?", help="registered benchmark; omit to list them")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for a registered benchmark (VALUE parsed as a Python literal)")
    p.add_argument("--model", choices=names, help="benchmark this hub entry's pipeline")
    p.add_argument("--size", default="tiny", choices=("tiny", "full"), help="network size (random weights)")
    p.add_argument("--height", type=int, default=128, help="OUTPUT frame height")
    p.add_argument("--width", type=int, default=128, help="OUTPUT frame width")
    p.add_argument("--frames", type=int, default=9, help="LR frames in the timed run")
    p.add_argument("--dtype", default="float32", choices=("float32", "bf16", "bfloat16", "fp16", "float16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks one by one (compile=True)")
    p.add_argument("--threads", type=int, help="CPU threads (1 on CPU by default)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="pipeline option")
    p.add_argument("--vs", action="append", default=[], metavar="KEY=VALUE",
                   help="also run with this setting changed (e.g. dtype=bf16, compile=True) and report the ratio")
    p.add_argument("--busy-ok", action="store_true", help="time even on a machine busier than its cores")
    p.add_argument("--count-only", action="store_true",
                   help="count FLOPs and launches only (the default for --size full on the CPU), no timing")
    p.add_argument("--counts", type=Path, metavar="JSON",
                   help="reuse the FLOP and launch count of an earlier run of the same model, size, frames and "
                        "options (its --json file) instead of counting again")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each module group (VAE, denoiser, flow, ...) in the timed run; eager only")
    p.add_argument("--json", type=Path, help="also write the result to this JSON file")
    p.set_defaults(run=_bench)
    return parser


# Errors a user can cause (bad arguments, paths or videos, missing weights or extras): their message,
# exit 2 like argparse's usage errors. Anything else is a bug of ours: its traceback, exit 1.
USER_ERRORS = (ValueError, OSError, MissingExtraError)
EXIT_USAGE = 2
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so that writes in progress delete their temporary files."""
    raise SystemExit(EXIT_SIGTERM)


def zoo_main(args: Sequence[str] | None = None) -> None:
    """The `zoo` command. Exit codes: 0 done, 2 bad input or arguments, 1 internal error, 130/143 on SIGINT/SIGTERM."""
    quiet_third_party()
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in LIGHTNING_SUBCOMMANDS:
        lightning_main(args)
        return
    ns = build_parser().parse_args(args)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        ns.run(ns)
    except BrokenPipeError:
        # The reader went away (`zoo hub card x | head`): not an error of ours.
        sys.stderr.close()
        raise SystemExit(0) from None
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_SIGINT) from None
    except SystemExit as exit_:
        if exit_.code == EXIT_SIGTERM:
            print("zoo: terminated", file=sys.stderr)
        raise
    except USER_ERRORS as err:
        message = str(err).strip() or type(err).__name__
        print(f"zoo: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
