"""The ``exfm`` command.

::

    exfm synth  --out data/synthetic --rows 1000000 --days 8 --seed 0     # the embedded default data
    exfm ingest --schema my.yaml --input 'raw/*.csv' --out data/mine      # your data, day-partitioned
    exfm train  --config configs/synthetic_fm.yaml --run-dir runs/fm      # one pass, checkpoints
    exfm train  --config configs/synthetic_fm.yaml --run-dir runs/fm --resume
    exfm eval   --run runs/fm --day 6                                      # exact next-day metrics
    exfm supervise --data D --out D2 --teacher-run runs/fm --days 5 6 7  # log FM predictions
    exfm export runs/vm --out serving/vm                                   # the served model
    exfm experiment theory --quick                                        # Theorems 3.1 and 3.2
    exfm models                                                            # the zoo: params, FLOPs
    exfm reproduce --data D --fm dcnv2,dcn --vm fm,deepfm --out runs/repro  # the paper's protocol
    exfm report runs/repro                                                 # tables + plots of a run
    exfm demo                                                              # the whole story, small

Every command prints a clear error (file, row, field) and exits with status 2 on bad input
(``EXFM_DEBUG=1`` shows the traceback instead); ``--help`` on each command explains its options.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from exfm.data.dataset import DatasetError
from exfm.data.sources import SOURCES
from exfm.schema import SchemaError
from exfm.train.config import ConfigError

USER_ERRORS = (SchemaError, ConfigError, DatasetError, FileNotFoundError, FileExistsError, ValueError)


def _cmd_synth(args: argparse.Namespace) -> None:
    from exfm.data.synth import synthesize

    manifest = synthesize(
        args.out,
        rows=args.rows,
        days=args.days,
        seed=args.seed,
        raw_csv=args.raw_csv,
        overwrite=args.overwrite,
    )
    print(f"wrote {manifest.rows:,} rows over {len(manifest.days)} days to {args.out}")


def _cmd_ingest(args: argparse.Namespace) -> None:
    from exfm.data.ingest import ingest
    from exfm.data.sources import adapt
    from exfm.schema import load_schema

    if args.source is not None:
        if args.schema or args.input or not args.raw:
            raise SystemExit("exfm ingest --source NAME takes --raw DIR (and no --schema / --input)")
        manifest = adapt(
            args.source,
            args.raw,
            args.out,
            overwrite=args.overwrite,
            memory_limit_mb=args.memory_mb,
            on_bad_row=args.on_bad_row or "skip",
        )
    else:
        if not args.schema or not args.input:
            raise SystemExit("exfm ingest needs --schema and --input (or --source NAME --raw DIR)")
        manifest = ingest(
            load_schema(args.schema),
            args.input,
            args.out,
            on_bad_row=args.on_bad_row or "error",
            overwrite=args.overwrite,
            memory_limit_mb=args.memory_mb,
        )
    print(
        f"wrote {manifest.rows:,} rows over {len(manifest.days)} days to {args.out} "
        f"(rejected {manifest.rejected_rows:,}, out of range {manifest.dropped_out_of_range:,})"
    )


def _cmd_train(args: argparse.Namespace) -> None:
    from exfm.train.config import load_train_config
    from exfm.train.report import format_eval_table
    from exfm.train.trainer import train

    overrides = {"device": args.device, "data": args.data}
    config = load_train_config(args.config, overrides)
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    result = train(config, run_dir, resume=args.resume, show_progress=not args.quiet)
    print(f"trained {result.examples:,} examples; run directory {result.run_dir}")
    for day, metrics in result.evaluations.items():
        print(format_eval_table({f"{config.model.name} (day {day})": metrics}))


def _cmd_eval(args: argparse.Namespace) -> None:
    from exfm.train.report import format_eval_table
    from exfm.train.trainer import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.run, args.day, checkpoint=args.checkpoint, device=args.device)
    print(format_eval_table({f"{args.run} @ {args.checkpoint} (day {args.day})": metrics}, by_domain=args.by_domain))


def _cmd_supervise(args: argparse.Namespace) -> None:
    from exfm.distill.supervision import OracleTeacher, RunTeacher, log_supervision

    if (args.teacher_run is None) == (args.oracle_shift is None):
        raise ValueError("name exactly one teacher: --teacher-run RUN or --oracle-shift S")
    teacher = (
        RunTeacher(args.teacher_run, checkpoint=args.checkpoint, device=args.device)
        if args.teacher_run
        else OracleTeacher(shift=args.oracle_shift)
    )
    manifest = log_supervision(args.data, args.out, teacher, args.days, overwrite=args.overwrite)
    print(f"wrote {manifest.rows:,} rows to {args.out} with {teacher.snapshot_id} predictions on days {args.days}")


def _cmd_export(args: argparse.Namespace) -> None:
    from exfm.serving.export import export_run

    manifest = export_run(args.run, args.out, args.checkpoint, data=args.data, onnx=not args.no_onnx,
                          overwrite=args.overwrite)  # fmt: skip
    print(f"exported {manifest['parameter_count']['total']:,} parameters ({manifest['training_method']}) to {args.out}")


def _cmd_experiment(args: argparse.Namespace) -> None:
    from exfm.experiments.theory import format_theory_table, run_theory

    result = run_theory(args.out, seeds=args.seeds, rows=args.rows, quick=args.quick)
    print(format_theory_table(result))


def _cmd_das_publish(args: argparse.Namespace) -> None:
    from exfm.das.snapshots import publish_snapshot

    info = publish_snapshot(args.spd, args.run, args.checkpoint, fm=args.fm)
    print(f"published snapshot {info.snapshot_id} to {args.spd}")


def _cmd_das_worker(args: argparse.Namespace) -> None:
    from exfm.das.worker import DASConfig, Worker

    worker = Worker(DASConfig.load(args.config), worker_id=args.worker_id)
    print(f"DAS worker {worker.worker_id} started", flush=True)
    stop = threading.Event()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: stop.set())
    worker.run(stop, until_idle_s=args.until_idle)
    status = worker.status()
    print(f"DAS worker {worker.worker_id} stopped: committed {status['committed']:,} examples, "
          f"supervision coverage {status['supervision_coverage']:.3f}")  # fmt: skip


def _cmd_das_status(args: argparse.Namespace) -> None:
    from exfm.das.worker import DASConfig, format_status, read_status

    status = read_status(DASConfig.load(args.config))
    print(json.dumps(status, indent=2) if args.json else format_status(status))


def _cmd_das_replay(args: argparse.Namespace) -> None:
    from exfm.das.events import replay_into
    from exfm.das.worker import DASConfig, open_backends

    config = DASConfig.load(args.config)
    log = open_backends(config).log
    close = int(max(config.windows_s.values()) * 1e6) + 1 if args.close else None
    span = int(min(config.windows_s.values()) * 1e6) // 2  # a batch never outruns the shortest window
    appended = replay_into(log, args.data, args.days, speed=args.speed, max_span_us=span, close_with_watermark_us=close)
    print(f"appended {appended:,} events from {args.data}")


def _cmd_models(args: argparse.Namespace) -> None:
    from exfm.data.dataset import open_dataset
    from exfm.data.synth import synthetic_schema
    from exfm.experiments.zoo import synthetic_zoo
    from exfm.models.registry import build_model, count_parameters, flops_per_example

    schema = open_dataset(args.data).schema if args.data else synthetic_schema()
    header = ("model", "role", "sparse params", "dense params", "dense MACs/ex", "lookups/ex")
    rows = []
    for name, entry in synthetic_zoo(schema, args.embedding_dim).items():
        model = build_model(entry.config, schema, schema.tasks)
        params, cost = count_parameters(model), flops_per_example(model, schema)
        rows.append((name, entry.role, f"{params.sparse:,}", f"{params.dense:,}", f"{cost.dense_macs:,}",
                     f"{cost.lookup_rows:,}"))  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"schema {schema.name!r}, embedding dim {args.embedding_dim}, tasks {schema.tasks}")
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def _cmd_demo(args: argparse.Namespace) -> None:
    from exfm.demo import run_demo

    run_demo(Path(args.out), rows=args.rows, seed=args.seed, device=args.device)


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from exfm.experiments.report import main_table_text
    from exfm.experiments.reproduce import Reproduction, parse_reproduce_config

    def items(text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    config = parse_reproduce_config(
        {
            "data": args.data,
            "dataset": args.dataset_name,
            "fms": items(args.fm),
            "vms": items(args.vm),
            "methods": items(args.methods),
            "seeds": items(args.seeds),
            "studies": items(args.studies),
            "fm_days": args.fm_days,
            "multitask_fm": args.multitask_fm,
            "vm_warmup": args.vm_warmup,
            "keep_vm_checkpoints": args.keep_vm_checkpoints,
            "sweep": {"gs": items(args.sweep_gs), "ls": items(args.sweep_ls), "lw": items(args.sweep_lw)},
            "device": args.device,
        }
    )
    results = Reproduction(config, args.out).run()
    print(main_table_text(results))
    print(f"\nresults: {args.out / 'results.json'}; the report: exfm report {args.out}")


def _cmd_report(args: argparse.Namespace) -> None:
    from exfm.experiments.report import write_report

    report = write_report(args.run, args.out)
    print(f"wrote {report.markdown} and {report.html} with {len(report.plots)} plots")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exfm",
        description="ExFM: train a large foundation model on streaming data and distil it into small vertical "
        "models at no extra serving cost. Start with `exfm demo`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "synth",
        help="generate the synthetic stream (the embedded default data set)",
        description="Generate time-ordered synthetic impressions with 3 domains, 3 tasks (click, like, follow), "
        "Zipf ids with churn, drift, a behaviour sequence and teacher-only signal; the true probability of each "
        "label is stored with each row. Writes a day-partitioned dataset ready for `exfm train`.",
    )
    p.add_argument("--out", required=True, help="output dataset directory (must not exist unless --overwrite)")
    p.add_argument("--rows", type=int, default=1_000_000, help="total rows over all days (default 1,000,000)")
    p.add_argument("--days", type=int, default=8, help="number of calendar days (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
    p.add_argument("--raw-csv", action="store_true", help="also write raw/synthetic.csv and raw/schema.yaml")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "ingest",
        help="turn raw CSV / TSV / Parquet files into a day-partitioned dataset",
        description="Validate every row against a schema YAML (see docs/schema.md), hash categorical ids with a "
        "stable hash, split by time into days and write Parquet partitions sorted by time plus a manifest. "
        "Memory stays bounded at any input size; the output appears only when complete.",
    )
    p.add_argument("--schema", help="schema YAML (see docs/schema.md)")
    p.add_argument("--input", nargs="+", help="input file(s) or glob(s), e.g. 'raw/*.csv'")
    p.add_argument(
        "--source",
        choices=sorted(SOURCES),
        help="a public dataset's original raw files instead of --schema/--input (docs/datasets.md)",
    )
    p.add_argument("--raw", help="with --source: the folder holding the dataset's raw files")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument(
        "--on-bad-row",
        choices=["error", "skip"],
        help="error (default with --schema): stop at the first bad row, naming file, line and column; "
        "skip (default with --source): count bad rows and write them to OUT/rejects.csv",
    )
    p.add_argument("--memory-mb", type=int, default=1024, help="memory budget of the out-of-core sort (MB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser(
        "train",
        help="train a model one pass over a range of days, then evaluate later days",
        description="One-pass streaming training in time order with progressive evaluation (each batch is "
        "scored before the model trains on it), checkpoints every K batches and at day ends, and exact "
        "evaluation of the config's eval_days. The run directory gets config.yaml, metrics.jsonl, "
        "checkpoints/ and summary.json. See configs/ for examples.",
    )
    p.add_argument("--config", required=True, help="training config YAML (see configs/synthetic_fm.yaml)")
    p.add_argument("--run-dir", type=Path, help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--data", help="override the config's dataset directory")
    p.add_argument("--device", help="override the config's device: cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a run's checkpoint on one day",
        description="Exact AUC, LogLoss, NE and calibration of a trained run's serving heads on one day, "
        "per task (and per domain with --by-domain).",
    )
    p.add_argument("--run", required=True, type=Path, help="run directory of `exfm train`")
    p.add_argument("--day", required=True, type=int, help="the day to evaluate")
    p.add_argument("--checkpoint", default="last", help="checkpoint name: last (default) or day-04 etc.")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--by-domain", action="store_true", help="also print one row per domain")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "supervise",
        help="log a teacher's predictions next to a dataset (batch supervision, fm:<task> columns)",
        description="Write a copy of a dataset whose rows on the given days carry the teacher's predicted "
        "probability per task (columns fm:<task>, with the snapshot id and its train-through time), which "
        "`exfm train` with a distillation method reads. The teacher is a trained run (--teacher-run) or, on "
        "the synthetic stream, the true probabilities with a known logit shift (--oracle-shift).",
    )
    p.add_argument("--data", required=True, help="the input dataset directory")
    p.add_argument("--out", required=True, help="the output dataset directory")
    p.add_argument("--days", required=True, type=int, nargs="+", help="the days to supervise, e.g. 5 6 7")
    p.add_argument("--teacher-run", type=Path, help="a run directory of `exfm train` (the FM)")
    p.add_argument("--checkpoint", default="day-04", help="the teacher's checkpoint (default day-04)")
    p.add_argument("--oracle-shift", type=float, help="synthetic data only: true probabilities, logit + S")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_supervise)

    p = sub.add_parser(
        "export",
        help="export a run's served model (backbone + serving heads) as a standalone artifact",
        description="Write the served vertical model of a run: model.pt2 (torch.export; loads with torch "
        "alone, without exfm), model.onnx where the ONNX export works, and manifest.json (schema fingerprint, "
        "inputs, tasks, parameter count, training method). Training-only heads (auxiliary, adapter) are "
        "dropped: an ExFM-trained model serves exactly like one trained without a teacher.",
    )
    p.add_argument("run", type=Path, help="run directory of `exfm train`")
    p.add_argument("--out", required=True, type=Path, help="artifact directory")
    p.add_argument("--checkpoint", default="last", help="checkpoint name: last (default), day-04, ...")
    p.add_argument("--data", help="the dataset directory, if it moved since training")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "experiment",
        help="run an experiment: `exfm experiment theory` checks Theorems 3.1 and 3.2",
        description="theory: on the synthetic stream with several seeds, (3.1) a teacher with a known bias "
        "distilled with kd vs ah vs none — does KD transfer the bias and AH keep the serving head calibrated? "
        "(3.2) a stale teacher under drift with ah vs ah_sa — does the Student Adapter help? Prints means and "
        "spreads and writes theory.json / theory.md.",
    )
    p.add_argument("name", choices=["theory"], help="the experiment")
    p.add_argument("--out", default="runs/theory", type=Path, help="results directory (default runs/theory)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--rows", type=int, help="rows per synthetic stream (default 200k quick, 1M full)")
    p.add_argument("--quick", action="store_true", help="the small setting (about 1.5 minutes for 3 seeds)")
    p.set_defaults(func=_cmd_experiment)

    das = sub.add_parser(
        "das",
        help="the Data Augmentation Service: workers, status, replay, snapshot publishing",
        description="The Data Augmentation Service (docs/das.md): equal workers join impressions and labels, "
        "log the FM's supervision and commit exactly once to the shared store; `publish` adds FM snapshots.",
    )
    das_sub = das.add_subparsers(dest="das_command", required=True, metavar="DAS_COMMAND")
    p = das_sub.add_parser(
        "publish",
        help="publish an FM snapshot (served weights, manifest with checksum, DONE marker last)",
        description="Write <SPD>/<snapshot id>/weights.safetensors, manifest.json (checksum, config, "
        "train-through time) and a DONE marker, each atomically, so that a reader never sees a partial snapshot.",
    )
    p.add_argument("--spd", required=True, type=Path, help="the Snapshot Publishing Database directory")
    p.add_argument("--run", required=True, type=Path, help="the FM's run directory of `exfm train`")
    p.add_argument("--checkpoint", default="last", help="checkpoint name: last (default), day-04, ...")
    p.add_argument("--fm", required=True, help="the FM's name (one pointer per FM in Zeus)")
    p.set_defaults(func=_cmd_das_publish)
    p = das_sub.add_parser(
        "worker",
        help="run one DAS worker (joiner + FM supervision + updater + loader) until stopped",
        description="Run one equal DAS task. Workers share the log's partitions through leased claims; start "
        "as many as you like with the same config. SIGTERM or Ctrl-C stops it cleanly (claims released).",
    )
    p.add_argument("--config", required=True, type=Path, help="the DAS config YAML (docs/das.md)")
    p.add_argument("--worker-id", help="a unique id (default: host-pid-time)")
    p.add_argument("--until-idle", type=float, help="stop after this many seconds without new log entries")
    p.set_defaults(func=_cmd_das_worker)
    p = das_sub.add_parser(
        "status",
        help="lag, throughput, window backlog, snapshot per worker, supervision coverage and staleness",
        description="Print the claims, checkpoints and log backlog per partition and every worker's last report.",
    )
    p.add_argument("--config", required=True, type=Path, help="the DAS config YAML")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=_cmd_das_status)
    p = das_sub.add_parser(
        "replay",
        help="turn a dataset's rows into impression and label events in the DAS log",
        description="Append an impression per row and a label per positive task (1 s later) to the configured "
        "log, optionally paced in event time.",
    )
    p.add_argument("--config", required=True, type=Path, help="the DAS config YAML")
    p.add_argument("--data", required=True, type=Path, help="an exfm dataset")
    p.add_argument("--days", required=True, type=int, nargs="+", help="days to replay, in order (e.g. 1 2 3 4)")
    p.add_argument("--speed", type=float, default=0.0, help="event seconds per wall second (default 0: no pacing)")
    p.add_argument("--close", action="store_true", help="finally send watermarks that close every window")
    p.set_defaults(func=_cmd_das_replay)

    p = sub.add_parser(
        "reproduce",
        help="run the paper's rolling protocol (FM days 1-4, then FM supervision via DAS, VM on day t, eval t+1)",
        description="DESIGN.md section 2 on a dataset: one FM run per teacher (a checkpoint at every day end); for "
        "each day t > F its day-(t-1) snapshot supervises day t through an embedded DAS deployment; each student x "
        "method x seed trains on the supervised days and is evaluated on the next day. Everything is cached under "
        "--out and an interrupted run resumes where it stopped. Writes OUT/results.json (see docs/reproduce.md).",
    )
    p.add_argument("--data", required=True, type=Path, help="an exfm dataset with days 1..N (N >= F + 2)")
    p.add_argument("--out", required=True, type=Path, help="the run directory (reused: finished parts are skipped)")
    p.add_argument("--fm", default="dcnv2", help="teachers, comma-separated (zoo names; default dcnv2)")
    p.add_argument("--vm", default="fm", help="students, comma-separated (default fm)")
    p.add_argument("--methods", default="none,kd,ah,ah_sa", help="of none,kd,ah,ah_sa (default: all four)")
    p.add_argument("--seeds", default="0", help="VM seeds, comma-separated (default 0)")
    p.add_argument(
        "--studies",
        default="main,freshness,staleness",
        help="comma-separated, of main,multi_domain,multi_task,freshness,staleness,sweep "
        "(default main,freshness,staleness)",
    )
    p.add_argument("--fm-days", type=int, default=4, help="F: days the FM trains before any VM (default 4)")
    p.add_argument("--dataset-name", default="", help="the name in the result rows (default: the data dir's name)")
    p.add_argument("--multitask-fm", default="multitask(dcnv2)", help="the teacher of the multi_task study")
    p.add_argument(
        "--vm-warmup", action="store_true", help="VMs first train days 1..F on labels alone (off in the paper)"
    )
    p.add_argument(
        "--keep-vm-checkpoints", action="store_true", help="keep VM checkpoints after evaluation (default: deleted)"
    )
    for name, default in (("gs", "0.5,1,2"), ("ls", "1,2"), ("lw", "1")):
        p.add_argument(f"--sweep-{name}", default=default, help=f"{name.upper()} values of the sweep ({default})")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser(
        "report",
        help="tables and plots of a reproduction run: RUN/report/report.md, report.html and PNGs",
        description="Read RUN/results.json (written by `exfm reproduce`) and write the paper's tables (mean ± std "
        "over seeds, NE gain % vs none, a verdict on the order none < kd < ah < ah_sa) and plots (progressive NE, "
        "AUC per day, freshness, staleness, sweep) as report.md with PNGs and a self-contained report.html "
        "(see docs/reproduce.md).",
    )
    p.add_argument("run", type=Path, help="the run directory holding results.json")
    p.add_argument("--out", type=Path, help="the report directory (default RUN/report)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "models",
        help="list the model zoo with parameter counts and per-example compute",
        description="Build every model of the zoo (teachers: DCN, DCNv2, DMIN, multi-task; students: FM, FmFM, "
        "DeepFM, DLRM, two-tower) for a schema and print sparse (embedding) and dense parameter counts, dense "
        "multiply-adds per example and embedding rows gathered per example. Teachers see every feature; students "
        "do not see the synthetic stream's teacher-only features.",
    )
    p.add_argument("--data", help="a dataset directory whose schema to use (default: the synthetic schema)")
    p.add_argument("--embedding-dim", type=int, default=16, help="embedding width (default 16)")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser(
        "demo",
        help="the whole ExFM story on synthetic data: FM -> DAS -> VMs with each method -> table and report",
        description="The embedded end-to-end job: synthesise the stream, train the DCNv2 foundation model, log "
        "its daily snapshots' predictions through DAS, train the FM and DeepFM vertical models with none / KD / "
        "AH / AH+SA on days 5-7, evaluate each next day, print the Table-2-style result and write the report "
        "(OUT/run/report/report.html). Cached: a second call reuses what is done.",
    )
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out)")
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows over 8 days (default 1,000,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        if os.environ.get("EXFM_DEBUG"):
            raise
        print(f"exfm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"exfm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
