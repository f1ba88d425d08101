"""Command line: ``python -m lightning_zero consolidate CKPT OUT.ckpt [--optimizer]``."""

from __future__ import annotations

import argparse
import sys

from lightning_zero.checkpoint import CheckpointError, consolidate_checkpoint, save_file_atomically


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_zero")
    commands = parser.add_subparsers(dest="command", required=True)
    consolidate = commands.add_parser(
        "consolidate", help="turn a sharded checkpoint directory into one plain Lightning checkpoint file")
    consolidate.add_argument("checkpoint", help="the sharded checkpoint directory (what ZeroStrategy saved)")
    consolidate.add_argument("output", help="the file to write (written atomically)")
    consolidate.add_argument("--optimizer", action="store_true",
                             help="also consolidate the optimizer state (to resume under plain ddp)")
    args = parser.parse_args(argv)
    try:
        checkpoint = consolidate_checkpoint(args.checkpoint, optimizer=args.optimizer)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_file_atomically(checkpoint, args.output)
    tensors = sum(v.numel() for v in checkpoint["state_dict"].values() if hasattr(v, "numel"))
    print(f"wrote {args.output}: {len(checkpoint['state_dict'])} entries, {tensors:,} elements"
          + (", optimizer state included" if args.optimizer else ", weights only"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
