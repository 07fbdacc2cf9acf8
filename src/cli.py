"""The ``biaslens`` command line. Thin: each subcommand parses arguments and calls the library.

Subcommand modules are imported only to add their arguments (they must not import torch at
module level), so ``biaslens --help`` stays fast. Bad input ends in one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["REGISTRY", "build_parser", "main"]

# name -> module defining COMMANDS[name] = (help, add_arguments, run)
REGISTRY: dict[str, str] = {
    "info": "biaslens.commands",
    "export": "biaslens.commands",
    "locate": "biaslens.locate.cli",
    "evaluate": "biaslens.evaluate.cli",
    "compare": "biaslens.evaluate.cli",
    "edit": "biaslens.edit.cli",
    "unlearn": "biaslens.unlearn.cli",
    "demo": "biaslens.demo",
}


def _commands():
    for name, module in REGISTRY.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a subcommand not built yet
            if exc.name and exc.name.startswith("biaslens"):
                continue
            raise
        if name in getattr(mod, "COMMANDS", {}):
            yield name, mod.COMMANDS[name]


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line on stderr (``biaslens edit: error: --alpha must be ...``), exit 2."""

    def error(self, message: str):
        import re

        message = re.sub(r"^argument ([^:]+): must", r"\1 must", message)
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    import biaslens
    from biaslens import cliargs

    parser = _Parser(
        prog="biaslens",
        description="Find where a language model stores a social bias, and remove it there.",
    )
    parser.add_argument("--version", action="version", version=f"biaslens {biaslens.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_arguments, run) in _commands():
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        p.add_argument("--dtype", default="float32",
                       help="float32 | float16 | bfloat16 (default: float32)")
        big = p.add_argument_group(
            "models larger than memory (accelerate big-model inference; docs/offload.md)")
        big.add_argument("--device-map", type=cliargs.device_map, metavar="MAP",
                         help="place the model with accelerate instead of --device: auto, balanced, "
                              "balanced_low_0, sequential, one device (cpu, disk, 0) or "
                              "MODULE=DEVICE pairs (model.layers=disk,lm_head=cpu)")
        big.add_argument("--max-memory", type=cliargs.max_memory, metavar="SIZE",
                         help="memory the model may use: one size (3GiB: every GPU's, or the CPU's "
                              "without a GPU; the rest goes to disk) or DEVICE=SIZE pairs "
                              "(0=20GiB,cpu=60GiB); implies --device-map auto")
        big.add_argument("--offload-folder", metavar="DIR",
                         help="folder for disk-offloaded weights that must be re-saved and for edited "
                              "copies (biaslens writes only its own subfolder there, removed at exit); "
                              "implies --device-map auto")
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0; a bad flag printed its line
        if exc.code in (0, None):
            raise
        return 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from biaslens.errors import BiasLensError

    placement = {k: getattr(args, k, None) for k in ("device_map", "max_memory", "offload_folder")}
    placed = any(v is not None for v in placement.values())
    if placed and getattr(args, "device", "cpu") not in (None, "cpu"):
        print(f"biaslens {args.command}: error: give --device or --device-map/--max-memory/"
              "--offload-folder, not both (a device map places the model itself)", file=sys.stderr)
        return 2
    try:
        if placed:  # reaches the load of the model the command names (biaslens.model.load)
            from biaslens.model import placement_defaults

            with placement_defaults(getattr(args, "model", None), **placement):
                return int(args._run(args) or 0)
        return int(args._run(args) or 0)
    except BiasLensError as exc:
        print(f"biaslens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:  # a reader that did not name its file
        print(f"biaslens {args.command}: error: an input file is not UTF-8 text ({exc.reason} at "
              f"byte {exc.start}); save it as UTF-8", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
