"""What every stage command shares: its common flags and one mapping of errors to exit codes.

Exit status of every stage command: 0 done; 1 failed rows above the stage's
`max_failed_fraction` (a rerun retries what can be retried); 2 bad manifest, arguments or
input, a missing model, or another job holds the lock — nothing was built; 3 a shard
could not be built (disk full, a worker or engine died) — the shards committed so far
stay valid, rerun after fixing the cause.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.core.manifest import ManifestError, resolved_text
from pipeline.core.shards import DiskFullError, LockHeldError
from pipeline.core.stage import StageInputError, StageResult

EXIT_CODES = """Exit status: 0 done; 1 failed rows above the stage's max_failed_fraction (rerun to retry
them); 2 bad manifest, arguments, input or model, or another job holds the lock (nothing
built); 3 a shard could not be built (disk full, worker or engine died; rerun after fixing)."""


def stage_parser(doc: str, *, shard_required: bool = True, actors: bool = True) -> argparse.ArgumentParser:
    """--manifest, --shard N | --all, --out, --no-progress (and --actors K)."""
    ap = argparse.ArgumentParser(description=f"{doc}\n{EXIT_CODES}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="manifest JSON (see manifests/)")
    which = ap.add_mutually_exclusive_group(required=shard_required)
    which.add_argument("--shard", type=int, help="build this one shard, in this process")
    which.add_argument("--all", action="store_true", help="build every shard that is missing or stale")
    ap.add_argument("--out", help="output root; overrides the manifest's \"output\"")
    if actors:
        ap.add_argument("--actors", type=int,
                        help="with --all: this many Ray actors, each holding the model once "
                             "(default: one per GPU of the cluster, else 1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_print_manifest(ap)
    return ap


def add_print_manifest(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--print-manifest", action="store_true",
                    help="print the manifest as resolved (extends merged, ${VAR} expanded) and exit")


def print_manifest_if_asked(argv: list[str] | None = None) -> int | None:
    """Handle `--print-manifest` before the real parse (which may require --shard/--all):
    0 after printing, 2 on a bad manifest, None when the flag is absent."""
    argv = sys.argv[1:] if argv is None else argv
    if "--print-manifest" not in argv:
        return None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--manifest", required=True)
    args, _ = pre.parse_known_args(argv)
    try:
        text, chain = resolved_text(args.manifest)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("resolved from " + " <- ".join(str(p) for p in chain), file=sys.stderr)
    sys.stdout.write(text)  # pure JSON on stdout: it pipes into jq or a file
    return 0


def check_shard_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.shard is not None and args.shard < 0:
        ap.error("--shard must be 0 or more")
    if getattr(args, "actors", None) is not None and args.actors < 1:
        ap.error("--actors must be at least 1")


def run_command(job: Callable[[], StageResult]) -> int:
    """Run a stage job, print its summary, and turn every error into its exit code."""
    try:
        result = job()
    except (ManifestError, StageInputError, LockHeldError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    except DiskFullError as e:  # the shards committed so far stay valid; rerun after freeing space
        print(f"error: {e.strerror}", file=sys.stderr)
        print(f"ERROR {e.strerror}")
        return 3
    except Exception as e:  # an engine or I/O failure: said plainly, not as a bare traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    print(result.summary())
    return result.exit_code
