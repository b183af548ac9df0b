"""`spinecohort` command line: one subcommand per workflow step.

Errors the user can fix (bad arguments, bad manifest, unwritable folder) end
as one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("spinecohort")

_COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {}


def _command(name: str):
    def register(fn: Callable[[argparse.Namespace], None]):
        _COMMANDS[name] = fn
        return fn

    return register


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinecohort", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic phantom cohort (BIDS tree + references + manifest)")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--subjects", type=_positive, default=4, help="number of subjects (default 4)")
    p.add_argument("--preset", default="small", help="grid preset: small (coarse, fast) or nako (448x448x15)")
    p.add_argument("--seed", type=_non_negative, default=0, help="random seed (default 0)")
    p.add_argument("--first-index", type=_non_negative, default=1, help="index of the first subject (default 1)")
    p.add_argument("--anomaly", default="none", help="none, l6, t13, t11 (transitional vertebrae), random or mixed (by subject index: none, t13, none, l6, t11)")
    p.add_argument("--batch-size", type=_positive, default=10, help="images per batch in the manifest")
    p.add_argument("--snapshot", action="store_true", help="also write a PNG per image")
    p.add_argument("--motion-mm", type=float, default=0.0, help="largest shift (mm) of a station against the subject")
    p.add_argument("--motion-deg", type=float, default=0.0, help="largest rotation (degrees) of a station about its centre")
    p.add_argument("--failures", type=float, default=0.0,
                   help="chance (0-1) of an injected acquisition failure per station, for validating QC (listed in injected_failures.tsv)")
    p.add_argument("--ribs", action="store_true", help="ribs in the images (thoracic vertebrae; T13 short; not in the references)")
    p.add_argument("--rudimentary-t12", type=float, default=0.0, help="with --ribs: chance (0-1) of a rudimentary 12th rib pair")
    p.add_argument("--lumbar-ribs", type=float, default=0.0, help="with --ribs: chance (0-1) of a short rib pair on L1")

    p = sub.add_parser("manifest", help="build a cohort manifest from a BIDS tree, or check a TSV")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bids", type=Path, help="BIDS root holding sub-*/[ses-*/]anat/*_T2w.nii.gz")
    src.add_argument("--check", type=Path, help="a hand-written manifest TSV to check and batch")
    p.add_argument("--references", type=Path, help="derivatives folder with SPINEPS-named reference masks")
    p.add_argument("--previous", type=Path, help="earlier manifest whose batches are kept")
    p.add_argument("--batch-size", type=_positive, default=150, help="images per batch (default 150: ~5,400 jobs for 90,000 images)")
    p.add_argument("-o", "--output", type=Path, required=True, help="manifest TSV to write")

    p = sub.add_parser("retry", help="give failed images whose files were fixed new batches: the next run redoes exactly them")
    p.add_argument("--manifest", type=Path, required=True, help="the cohort manifest TSV (rewritten: the images' new batches)")
    p.add_argument("--failures", type=Path, required=True, help="the last run's summary/failures.tsv")
    p.add_argument("--all", action="store_true", help="every failed image, changed or not (after a fix of the software or the models)")
    p.add_argument("--batch-size", type=_positive, default=150, help="images per new batch (default %(default)s)")

    p = sub.add_parser("publish", help="relink a derivative into the BIDS tree from the restore folder that made it")
    p.add_argument("folder", type=Path, help="the batch's restore folder")
    p.add_argument("target", type=Path, help="the derivative to make (the folder holds a file of its name)")

    p = sub.add_parser("review", help="serve the QC review page on this node's 127.0.0.1 (e.g. a login node, behind an ssh tunnel)")
    p.add_argument("--summary", type=Path, default=Path("results/summary"), help="the run's summary folder (default results/summary)")
    p.add_argument("--decisions", type=Path, required=True, help="the decisions TSV the exported decisions are written to (qc.decisions)")
    p.add_argument("--port", type=_non_negative, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free one)")

    p = sub.add_parser("describe", help="the run's provenance (versions, models, parameters) and the derivatives' dataset_description.json")
    p.add_argument("--semantic-model", type=Path, required=True, help="semantic model folder")
    p.add_argument("--instance-model", type=Path, required=True, help="instance model folder")
    p.add_argument("--folds", nargs="+", required=True, help="semantic folds used")
    p.add_argument("--parameters", type=json.loads, required=True, help="JSON: the run's parameters (N4, metrics, ...)")
    p.add_argument("--out", type=Path, required=True, help="provenance JSON to write")
    p.add_argument("--dataset-description", type=Path, required=True, help="the derivatives tree's dataset_description.json")

    from . import pipeline, training

    pipeline.add_stage_parsers(sub)
    training.add_training_parsers(sub)
    return parser


@_command("phantom")
def _phantom(args: argparse.Namespace) -> None:
    from .phantom import write_cohort

    path = write_cohort(
        args.out,
        subjects=args.subjects,
        preset=args.preset,
        seed=args.seed,
        first_index=args.first_index,
        anomaly=args.anomaly,
        batch_size=args.batch_size,
        snapshot=args.snapshot,
        motion_mm=args.motion_mm,
        motion_deg=args.motion_deg,
        failures=args.failures,
        ribs=args.ribs,
        rudimentary_t12=args.rudimentary_t12,
        lumbar_ribs=args.lumbar_ribs,
    )
    print(path)


@_command("manifest")
def _manifest(args: argparse.Namespace) -> None:
    from . import cohort
    from .bids import write_manifest

    if args.bids is not None:
        rows = cohort.manifest_from_bids(args.bids, references=args.references)
    else:
        table = cohort.read_manifest_table(args.check)
        rows = cohort.resolve_paths(cohort.check_manifest(table, source=str(args.check), require_batch=False), args.check.parent)
    # Images that already have a batch (in --previous, or in the checked TSV) keep it.
    previous = cohort.read_manifest(args.previous) if args.previous else rows[rows["batch"] != ""] if "batch" in rows else None
    table = write_manifest(rows, args.output, batch_size=args.batch_size, previous=previous)
    log.info("wrote %d rows in %d batches to %s", len(table), table["batch"].nunique(), args.output)


@_command("retry")
def _retry(args: argparse.Namespace) -> None:
    from . import cohort, io

    table = cohort.read_manifest(args.manifest)
    failed = cohort.pd.read_csv(args.failures, sep="\t", dtype=str, keep_default_na=False)
    since = None if args.all else args.failures.stat().st_mtime
    chosen = cohort.retry_candidates(cohort.resolve_paths(table, args.manifest.parent), failed, changed_after=since)
    if not chosen:
        log.info("nothing to retry: no image of %s %s", args.failures,
                 "is still in the batch it failed in" if args.all else "has a file changed since it was written (--all takes every one)")
        return
    retried = cohort.retry(table, chosen, batch_size=args.batch_size)
    io.write_tsv(args.manifest, cohort.check_manifest(retried, source=str(args.manifest)))
    moved = retried.set_index("image_id").loc[chosen]
    for image_id, row in moved.iterrows():
        log.info("%s: %s -> %s", image_id, row.earlier_batches.split()[-1], row.batch)
    log.info("%d image(s) in %d new batch(es); run snakemake as before: it redoes them, their subjects' levels and the summaries",
             len(chosen), moved.batch.nunique())


@_command("publish")
def _publish(args: argparse.Namespace) -> None:
    from . import io

    source = args.folder / args.target.name
    if not source.is_file():
        raise FileNotFoundError(f"{source}: restore did not make it (see the ledger in {args.folder})")
    io.publish(source, args.target)
    log.info("linked %s to %s", args.target, source)


@_command("describe")
def _describe(args: argparse.Namespace) -> None:
    from . import io, provenance

    run = provenance.describe_run(semantic_model=args.semantic_model, instance_model=args.instance_model, folds=args.folds,
                                  parameters=args.parameters)
    io.write_json(args.dataset_description, provenance.dataset_description(run))
    io.write_json(args.out, run)  # last: what the stages read


@_command("review")
def _review(args: argparse.Namespace) -> None:
    import socket

    from .review_server import make_server

    server, token = make_server(args.summary, args.decisions, args.port)
    port = server.server_address[1]
    log.info("review page: http://127.0.0.1:%d/#token=%s (from your laptop: ssh -N -L %d:127.0.0.1:%d %s, then open it "
             "there); decisions go to %s; Ctrl-C stops", port, token, port, port, socket.gethostname(), args.decisions)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    from .runtime import JobClock, keep_freed_memory

    clock = JobClock()
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own logger only: third-party INFO chatter stays out of job logs.
    handler_ = logging.StreamHandler()
    handler_.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler_)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from .cohort import ManifestError
    from .io import ImageError

    handler = _COMMANDS.get(args.command) or args.handler
    try:
        handler(args)
    except (ManifestError, ImageError, ValueError, OSError) as exc:
        print(f"spinecohort {args.command}: error: {exc}", file=sys.stderr)
        return 2
    log.info("%s: %s", args.command, clock.line())  # what the job cost, as measured from inside
    return 0


if __name__ == "__main__":
    sys.exit(main())
