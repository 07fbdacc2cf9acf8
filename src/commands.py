"""``biaslens info`` and ``biaslens export``."""

from __future__ import annotations

import argparse
import json

__all__ = ["COMMANDS"]


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'organism', 'organism-llama', a local Hugging Face folder, or a hub name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _info(args) -> int:
    import biaslens

    m = biaslens.load(args.model, device=args.device, dtype=args.dtype)
    info = m.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model to export (spec as for `info`)")
    p.add_argument("--out", required=True, help="output folder (new or empty; biaslens never writes into a folder of yours)")
    p.add_argument("--force", action="store_true", help="replace an output folder that biaslens wrote (never a folder holding your files)")
    from biaslens.cliargs import size_bytes

    p.add_argument("--max-shard-size", type=size_bytes, metavar="SIZE",
                   help="largest weight file (e.g. 2GB); a model loaded with --device-map is always "
                        "sharded (default 2GB, the most memory the export holds at once)")


def _export(args) -> int:
    import biaslens
    from biaslens.export import check_out_dir, export

    check_out_dir(args.out, args.force)  # fail before loading a large model
    m = biaslens.load(args.model, device=args.device, dtype=args.dtype)
    out = export(m, args.out, force=args.force, max_shard_size=getattr(args, "max_shard_size", None))
    print(f"exported {args.model} to {out}")
    return 0


COMMANDS = {
    "info": ("show a model's architecture and where its MLP/attention pieces are", _info_args, _info),
    "export": ("write a model as a Hugging Face folder with manifest and delta", _export_args, _export),
}
