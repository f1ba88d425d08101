"""Command line: ``python -m lightning_zero consolidate CKPT OUT.ckpt [--optimizer] [--force]``."""

from __future__ import annotations

import argparse
import os
import sys

from lightning_zero.checkpoint import (
    CheckpointError,
    ShardedCheckpoint,
    consolidate_checkpoint,
    is_sharded_checkpoint,
    save_file_atomically,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_zero")
    commands = parser.add_subparsers(dest="command", required=True)
    consolidate = commands.add_parser(
        "consolidate", help="turn a sharded checkpoint directory into one plain Lightning checkpoint file")
    consolidate.add_argument("checkpoint", help="the sharded checkpoint directory (what ZeroStrategy saved)")
    consolidate.add_argument("output", help="the file to write (written atomically)")
    consolidate.add_argument("--optimizer", action="store_true",
                             help="also consolidate the optimizer state (to resume under plain ddp)")
    consolidate.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = parser.parse_args(argv)
    try:
        ShardedCheckpoint(args.checkpoint)  # the input first: is it a checkpoint at all?
        refusal = _refuse_output(args.checkpoint, args.output, args.force)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
        checkpoint = consolidate_checkpoint(args.checkpoint, optimizer=args.optimizer)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_file_atomically(checkpoint, args.output)
    tensors = sum(v.numel() for v in checkpoint["state_dict"].values() if hasattr(v, "numel"))
    print(f"wrote {args.output}: {len(checkpoint['state_dict'])} entries, {tensors:,} elements"
          + (", optimizer state included" if args.optimizer else ", weights only"))
    return 0


def _refuse_output(checkpoint: str, output: str, force: bool) -> str | None:
    """Why writing ``output`` could destroy data (the checkpoint itself, or another file), else None."""
    source, target = os.path.realpath(checkpoint), os.path.realpath(output)
    inside = target.startswith(source.rstrip(os.sep) + os.sep) and is_sharded_checkpoint(source)
    if target == source or inside:
        return (f"the output {output!r} is (or is inside) the checkpoint {checkpoint!r}; writing it would destroy the "
                "sharded checkpoint (its optimizer and scheduler state). Name another output file.")
    if os.path.isdir(target):
        inside = os.path.join(output, "model.ckpt")
        return f"the output {output!r} is a directory; name a file to write, e.g. {inside!r}"
    if os.path.lexists(target) and not force:
        return f"the output {output!r} exists; pass --force to overwrite it, or name another file"
    return None


if __name__ == "__main__":
    sys.exit(main())
