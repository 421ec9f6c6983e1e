"""``normconf``: certify an implementation of the norms against the exact references.

``normconf certify`` runs the accuracy battery (and with ``--speed`` the speed battery),
streaming every result to ``DIR/results.jsonl`` as it finishes (``--resume DIR`` goes on with an
interrupted run) and the inputs of every failed case to ``DIR/inputs/``; ``normconf replay CASE_ID
--dir DIR`` reruns one of them; ``normconf report DIR`` rebuilds a run's reports from that file, and
``normconf report merge DIR... --out DIR`` joins reports of several adapters and machines.

Exit status: 0 every check passed; 1 at least one check (accuracy or speed) failed; 2 the
adapter could not be loaded or run on this hardware, a report could not be read, or the
arguments are wrong (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from conformance import explorer
from conformance.cases import DTYPES, Case
from conformance.distributions import DISTRIBUTIONS
from conformance.progress import ProgressBar, SpeedProgress
from conformance.results import CheckResult, RunRecord
from conformance.specs import NORM_NAMES
from conformance.summary import printable, speed_table

if TYPE_CHECKING:
    from conformance.stream import StreamWriter
    from impls.adapter import Adapter

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


class UsageError(Exception):
    """Wrong arguments: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normconf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = commands.add_parser("certify", help="certify an adapter against the references")
    c.add_argument(
        "--adapter",
        required=True,
        metavar="SPEC",
        help="built-in name, pkg.module[:attr] or path/to/file.py[:attr]",
    )
    c.add_argument(
        "--norm",
        action="append",
        choices=NORM_NAMES,
        metavar="NAME",
        help=f"only this norm (repeatable): {', '.join(NORM_NAMES)}",
    )
    c.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        metavar="NAME",
        help=f"only this dtype (repeatable): {', '.join(DTYPES)}",
    )
    c.add_argument(
        "--distribution",
        action="append",
        choices=DISTRIBUTIONS,
        metavar="NAME",
        help="only this input distribution (repeatable)",
    )
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c.add_argument(
        "--quick",
        action="store_true",
        help="every check kind and distribution class, fewer shapes and seeds",
    )
    c.add_argument(
        "--large",
        action="store_true",
        help="add the GPU-sized cases: tensors past 2^31 elements, rows past 65535 tiles, "
        "rows past 2^20 (LayerNorm and RMSNorm; slow and memory-hungry on a CPU)",
    )
    c.add_argument("--seed", type=int, default=0, help="run seed (each case derives its own)")
    c.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="CASE_ID",
        help="run exactly this case (repeatable; from a report)",
    )
    c.add_argument(
        "--explore-budget",
        type=_elements,
        metavar="N",
        help="elements the shape and stride explorer may draw per norm (default: "
        f"{explorer.FULL.elements}, --quick {explorer.QUICK.elements}; 0: no exploring)",
    )
    c.add_argument(
        "--convention",
        choices=("declared", "pytorch"),
        default="declared",
        help="grade against the adapter's declared conventions or PyTorch's",
    )
    c.add_argument(
        "--report-dir",
        type=Path,
        metavar="DIR",
        help="where to write report.json, report.md, report.html and junit.xml "
        "(default: reports/ADAPTER-DEVICE-TIME)",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument(
        "--exit-zero",
        action="store_true",
        help="exit 0 when checks fail (the report says so); errors still exit 2",
    )
    c.add_argument(
        "--speed",
        action="store_true",
        help="also time every norm against the copy bandwidth and the baseline adapter",
    )
    c.add_argument(
        "--baseline",
        default="torch",
        metavar="SPEC",
        help="adapter timed beside the certified one with --speed (default torch; 'none': no "
        "baseline)",
    )
    c.add_argument(
        "--min-fraction",
        type=_fraction,
        metavar="F",
        help="least fraction of the copy bandwidth, both directions (default: speed.toml)",
    )
    c.add_argument(
        "--min-ratio",
        type=_positive,
        metavar="R",
        help="least speed relative to the baseline (default: speed.toml)",
    )
    c.add_argument(
        "--speed-config",
        type=Path,
        metavar="FILE",
        help="speed thresholds file replacing conformance/speed.toml",
    )
    c.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="go on with the interrupted run in DIR: its finished cases are kept, not rerun",
    )
    _isolation_options(c)
    p = commands.add_parser(
        "replay",
        help="rerun one case of a run on the inputs saved in its report directory",
    )
    p.add_argument("case_id", metavar="CASE_ID", help="a failed case's id, from the report")
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="the run's report directory (default: the current directory)",
    )
    p.add_argument(
        "--adapter",
        metavar="SPEC",
        help="the adapter to run (default: the run's, when a built-in; any other must be named)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's")
    _isolation_options(p)
    r = commands.add_parser(
        "report",
        help="rebuild a run's reports from DIR/results.jsonl (normconf report DIR), or join "
        "several runs (normconf report merge DIR... --out DIR)",
    )
    r.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="report directories")
    r.add_argument("--out", type=Path, metavar="DIR", help="where merge writes")
    return parser


def _isolation_options(parser: argparse.ArgumentParser) -> None:
    from conformance.worker import DEFAULT_TIMEOUT_S

    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds one call into the adapter may take before its worker is killed and the "
        f"check fails (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the adapter in this process, not in a worker (for a debugger; a crash then "
        "ends the run and --timeout has no effect)",
    )


def _timeout(args: argparse.Namespace) -> float | None:
    """The worker's per-call limit, or None for a run in this process."""
    return None if args.in_process else float(args.timeout)


def _elements(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of elements") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _fraction(text: str) -> float:
    value = _positive(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "adapter"


def default_report_dir(adapter_name: str, device: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path("reports") / f"{_slug(adapter_name)}-{device}-{stamp}"


def certify_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from conformance.engine import certify, select_cases
    from conformance.inputs import build_inputs
    from conformance.large import estimate
    from conformance.replay import save_inputs
    from conformance.reports import write_reports
    from conformance.stream import StreamWriter, check_resumable, read_stream
    from conformance.summary import summary_table
    from impls.loader import load_adapter, resolve_device

    adapter = load_adapter(args.adapter)
    device = resolve_device(adapter, args.device)
    try:
        cases = select_cases(
            norms=args.norm,
            dtypes=args.dtype,
            quick=args.quick,
            seed=args.seed,
            case_ids=args.case,
            distributions=args.distribution,
            large=args.large,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    cases = [c for c in cases if c.norm in adapter.norms()]
    if args.large:
        print(estimate([c for c in cases if c.large], device), file=sys.stderr)
    if not cases:
        raise UsageError(f"no cases to run: {adapter.name} implements {', '.join(adapter.norms())}")
    earlier = None
    if args.resume is not None:
        try:
            earlier = read_stream(args.resume)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            check_resumable(earlier.run, adapter.spec, args.seed, args.quick, args.convention)
        except ValueError as exc:
            raise UsageError(f"{args.resume} {exc}") from None
        cases = [c for c in cases if c.case_id not in earlier.cases]
    explored = set()
    if earlier is not None:  # a norm whose search finished is not searched again
        explored = {c.norm for c in earlier.record().checks if c.output == "search"}
    directory = args.resume or args.report_dir or default_report_dir(adapter.name, device)
    conventions: dict[str, dict[str, object]] | None = {} if args.convention == "pytorch" else None
    bar = ProgressBar(sys.stderr, enabled=not args.no_progress)
    stream: StreamWriter | None = None

    def progress(done: int, total: int, case: Case, results: list[CheckResult]) -> None:
        assert stream is not None
        if any(r.verdict == "fail" for r in results) and not case.large:
            save_inputs(directory, build_inputs(case))  # for normconf replay CASE_ID
        stream.case(case.case_id, results)
        bar(done, total, case, results)

    def started(record: RunRecord) -> None:
        nonlocal stream
        if earlier is not None:  # the run goes on under its first facts
            for name in ("hardware", "software", "started", "command"):
                setattr(record, name, earlier.run[name])
        stream = StreamWriter(directory, record, resume=earlier is not None)

    try:
        record = certify(
            adapter,
            cases,
            device=device,
            conventions=conventions,
            seed=args.seed,
            quick=args.quick,
            command=shlex.join(["normconf", *argv]),
            progress=progress,
            started=started,
            timeout=_timeout(args),
            explore=None
            if args.case or args.distribution
            else explorer.budget(quick=args.quick, elements=args.explore_budget),
            explore_norms=[n for n in args.norm or adapter.norms() if n not in explored],
            explore_dtypes=args.dtype,
        )
        assert stream is not None
        if earlier is not None:
            record.checks = earlier.record().checks + record.checks
        if args.speed:
            _speed(args, record, adapter, device, conventions, stream)
        stream.end(record.finished)
    finally:
        if stream is not None:
            stream.close()
    paths = write_reports(record, directory)
    print(summary_table(record))
    if record.speed:
        print(speed_table(record))
    print(f"reports: {', '.join(str(p) for p in paths.values())}")
    if args.exit_zero:
        return EXIT_PASS
    failed = record.verdict == "fail" or record.speed_verdict == "fail"
    return EXIT_FAIL if failed else EXIT_PASS


def _speed(
    args: argparse.Namespace,
    record: RunRecord,
    adapter: Adapter,
    device: str,
    conventions: dict[str, dict[str, object]] | None,
    stream: StreamWriter,
) -> None:
    """The speed battery after the accuracy run; the baseline loads like the adapter."""
    from conformance.engine import certify_speed
    from conformance.speed import load_thresholds
    from impls.loader import load_adapter

    try:
        thresholds = load_thresholds(
            device, args.speed_config, min_fraction=args.min_fraction, min_ratio=args.min_ratio
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    baseline = None
    if args.baseline.strip().lower() != "none":
        baseline = adapter if args.baseline == adapter.spec else load_adapter(args.baseline)
        if device not in baseline.devices:
            raise UsageError(
                f"baseline {baseline.name!r} does not run on {device}: pass --baseline none or "
                "another adapter"
            )
    certify_speed(
        record,
        adapter,
        device=device,
        baseline=baseline,
        thresholds=thresholds,
        norms=args.norm,
        dtypes=args.dtype,
        quick=args.quick,
        conventions=conventions,
        progress=SpeedProgress(
            sys.stderr, enabled=not args.no_progress, stream=stream, record=record
        ),
        timeout=_timeout(args),
    )


def report_command(args: argparse.Namespace) -> int:
    from conformance.merge import load_runs, write_merged
    from conformance.reports import write_reports
    from conformance.stream import read_stream

    first, *rest = args.dirs
    try:
        if str(first) == "merge":
            if not rest or args.out is None:
                raise UsageError("report merge needs at least one DIR and --out DIR")
            runs = load_runs(rest)
            paths = write_merged(runs, args.out)
            print(f"merged {len(runs)} runs: {', '.join(str(p) for p in paths.values())}")
            return EXIT_PASS
        if rest or args.out is not None:
            raise UsageError("normconf report DIR takes one directory (merge: report merge ...)")
        stream = read_stream(first)
        record = stream.record()
        paths = write_reports(record, first)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    state = "complete" if stream.finished else "interrupted"
    print(f"{state} run, {len(stream.cases)} cases, {len(record.checks)} checks")
    print(f"reports: {', '.join(str(p) for p in paths.values())}")
    return EXIT_PASS


def replay_command(args: argparse.Namespace) -> int:
    from conformance.checks import Target
    from conformance.messages import failure_message, reproduction_command
    from conformance.replay import load_inputs, replay
    from conformance.stream import read_stream
    from impls.loader import load_adapter, resolve_device

    try:
        stream = read_stream(args.dir)
        inputs = load_inputs(args.dir, args.case_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    run = stream.run
    spec = args.adapter or _recorded_builtin(str(run["adapter"]["spec"]), args.dir)
    adapter = load_adapter(spec)
    device = resolve_device(adapter, args.device or str(run["hardware"].get("device", "auto")))
    earlier = stream.cases.get(args.case_id, [])
    case = inputs.case
    convention = earlier[0].convention if earlier else adapter.conventions.get(case.norm, {})
    target = Target(
        adapter,
        device,
        {case.norm: convention},
        lambda c: reproduction_command(c.case_id, spec, int(run["seed"]), ["--device", device]),
    )
    results = replay(target, case, inputs, timeout=_timeout(args), seed=int(run["seed"]))
    print(
        printable(
            f"replay of {case.case_id} on {adapter.name} ({device}), inputs from {args.dir}", 300
        )
    )
    for result in results:
        print(f"\n[{result.kind} {result.output}] {result.verdict.upper()}")
        if result.verdict == "fail":
            print(failure_message(result))
        elif result.message:
            print(printable(result.message, 200))
    failed = any(r.verdict == "fail" for r in results)
    return EXIT_FAIL if failed else EXIT_PASS


def _recorded_builtin(spec: str, directory: Path) -> str:
    """The adapter a run's record names, when it is a built-in: a report directory is data, and
    replaying it must not import code it points to (a file, a module) unless the user names it."""
    from impls.registry import BUILTINS

    if spec not in BUILTINS:
        raise UsageError(
            f"the run in {directory} certified adapter {spec!r}; normconf runs an adapter's code "
            f"only when you name it: add --adapter {shlex.quote(spec)}"
        )
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    from impls.adapter import AdapterError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "certify":
            return certify_command(args, argv)
        if args.command == "report":
            return report_command(args)
        if args.command == "replay":
            return replay_command(args)
        raise UsageError(f"unknown command {args.command!r}")
    except (UsageError, AdapterError) as exc:
        print(f"normconf: error: {printable(str(exc), 1000)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("normconf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
