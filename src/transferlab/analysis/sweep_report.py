"""`transferlab-report <sweep folder>`: the jobs of a sweep, one row each, and the same jobs grouped by
everything but `seed` (mean, sample standard deviation and n over distinct seeds per cell and metric, failed
and running jobs counted), with a plot of a metric against one swept key, one line per value of another, error
bars over the seeds. Markdown (report.md), CSV (report.csv, report_cells.csv) and PNG."""

import csv
import io
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from transferlab.core.errors import UserError
from transferlab.core.fileio import atomic_write
from transferlab.core.tables import markdown_table
from transferlab.run.manifest import READER_ADVICE, Manifest

OVER = "seed"  # jobs that differ only in this key are repetitions of one cell
# Config keys that change where and how a run reports, not what it trains: jobs differing only in them (and in
# the swept keys) are one experiment.
NOT_THE_EXPERIMENT = {
    *(OVER, "paths", "verbose", "cache", "logger", "objective", "gain"),
    *("trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps"),
}


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job folder: its overrides, status, objective and metrics.

    A job folder is a sub-folder named by its job number or holding `.hydra/`; one without its
    `.hydra/config.yaml` or `.hydra/overrides.yaml` is an error that names it."""
    if not sweep_dir.is_dir():
        raise UserError(
            f"{sweep_dir} is not a folder: give the folder of a `transferlab -m ...` sweep "
            "(e.g. outputs/multirun/<date_time>)."
        )
    if (sweep_dir / ".hydra").is_dir():
        raise UserError(
            f"{sweep_dir} is a single run's folder (its table is {sweep_dir / 'results.md'}): give the "
            "folder of a sweep, which holds one such folder per job."
        )
    jobs = [
        p
        for p in sweep_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p.name.isdigit() or (p / ".hydra").exists())
    ]
    if not jobs:
        raise UserError(
            f"no job folders under {sweep_dir} (sub-folders holding .hydra/config.yaml and "
            ".hydra/overrides.yaml): give the folder of a `transferlab -m ...` sweep."
        )
    return [_job_row(job) for job in sorted(jobs, key=_job_key)]


def _job_row(job: Path) -> dict:
    config, overrides = (_read_yaml(job, name) for name in ("config.yaml", "overrides.yaml"))
    if not isinstance(config, dict) or not isinstance(overrides, list | type(None)):
        raise UserError(
            f"{job / '.hydra'}: config.yaml must hold a mapping and overrides.yaml a list, as Hydra "
            "writes them; this folder was not written by a transferlab sweep, move it out of the sweep."
        )
    pairs = (str(o).split("=", 1) for o in overrides or [] if "=" in str(o))
    overrides = {k.lstrip("+"): v for k, v in pairs}
    results = job / "results.json"
    metrics = _read_json(results) or {}
    reasons = _failed_stages(job)
    if results.is_file() and not metrics:
        reasons.append(
            "its results.json cannot be read (cut short?): run the sweep's command again into its folder (the same "
            "hydra.sweep.dir): its finished stages are skipped and results.json is written again"
        )
    return {
        "job": job.name,
        "status": _status(job, metrics),
        "reason": "; ".join(reasons),
        "overrides": overrides,
        "seed": overrides.get(OVER, str(config.get(OVER, ""))),
        "config": _experiment(config),
        "objective": metrics.get(config.get("objective"), math.nan),
        "metrics": metrics,
    }


def _failed_stages(job: Path) -> list[str]:
    """Why each failed stage of the job failed, from its manifest; a damaged manifest is itself the reason."""
    try:
        manifest = Manifest.load(job, READER_ADVICE)
    except UserError as err:
        return [str(err)]
    return [f"{name}: {r.reason or 'failed'}" for name, r in manifest.stages.items() if r.status == "failed"]


def _status(job: Path, metrics: dict) -> str:
    """`done` with a results.json (a run's last write); without one, `running` while a live run holds the
    folder's lock, else `failed` (it failed, or was killed). The lock is tried only then: runlock imports
    Lightning, which the report of a finished sweep need not load."""
    if metrics:
        return "done"
    from transferlab.run.runlock import held

    return "running" if held(job) else "failed"


def _experiment(config: dict, prefix: str = "") -> dict[str, str]:
    """The config as flat `key: value` text, without NOT_THE_EXPERIMENT."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name in NOT_THE_EXPERIMENT:
            continue
        if isinstance(value, dict) and value:
            flat.update(_experiment(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return flat


def _read_yaml(job: Path, name: str):
    path = job / ".hydra" / name
    if not path.is_file():
        raise UserError(
            f"job folder {job} has no .hydra/{name}: every job of a sweep holds the config.yaml and "
            "overrides.yaml Hydra writes; move a folder that is not a job out of the sweep, or re-run it."
        )
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"{path} cannot be read ({type(err).__name__}): re-run that job or move it out of the sweep."
        ) from None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None  # cut short: the job is shown as failed (or running), with its reason
    return data if isinstance(data, dict) else None


def _job_key(job: Path):
    return (0, int(job.name), "") if job.name.isdigit() else (1, 0, job.name)


def swept_keys(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs, sorted."""
    keys = {k for r in rows for k in r["overrides"]}
    return sorted(k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1)


def aggregate(rows: list[dict], keys: list[str]) -> list[dict]:
    """Group jobs by their values of `keys` (every swept key but `seed`) and, where jobs with the same values ran
    different configs (two sweeps merged into one folder, a config file edited in between), by config too: those
    are different experiments, and the cell's `config` names the keys that tell them apart.

    Per metric the mean, sample standard deviation (ddof=1, NaN for n < 2) and n over the cell's distinct seeds
    with a finite value: jobs that repeat a seed are one sample, not several, and the seed's value is their mean
    (with the same config and seed they should be equal); `duplicates` names them. `jobs`, `failed` and
    `running` count job folders; a running job is not averaged, so a cell of 3 seeds with one failure says
    n=2 of 3."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row["overrides"].get(k, "") for k in keys), []).append(row)
    names = sorted({m for r in rows for m in r["metrics"]})
    return [
        _summary(dict(zip(keys, values)), label, part, names)
        for values, members in groups.items()
        for label, part in _by_config(members)
    ]


def _by_config(members: list[dict]) -> list[tuple[str, list[dict]]]:
    """The jobs split by config, each part labelled with its values of the keys that differ ("" for one config)."""
    parts: dict[str, list[dict]] = {}
    for row in members:
        parts.setdefault(json.dumps(row["config"], sort_keys=True), []).append(row)
    if len(parts) == 1:
        return [("", members)]
    keys = {k for r in members for k in r["config"]}
    differ = sorted(k for k in keys if len({r["config"].get(k) for r in members}) > 1)
    more = f"; {len(differ) - 3} more keys differ" if len(differ) > 3 else ""
    return [
        ("; ".join(f"{k}={part[0]['config'].get(k, '(unset)')}" for k in differ[:3]) + more, part)
        for part in parts.values()
    ]


def _summary(values: dict, config: str, members: list[dict], names: list[str]) -> dict:
    by_seed: dict[str, list[dict]] = {}
    for row in members:
        by_seed.setdefault(row["seed"], []).append(row)
    stats = {}
    for name in names:
        xs = [statistics.fmean(v) for same in by_seed.values() if (v := _finite(same, name))]
        stats[name] = {
            "mean": statistics.fmean(xs) if xs else math.nan,
            "std": statistics.stdev(xs) if len(xs) > 1 else math.nan,
            "n": len(xs),
        }
    return {
        "values": values,
        "config": config,
        "job_names": [r["job"] for r in members],
        "jobs": len(members),
        "failed": sum(r["status"] == "failed" for r in members),
        "running": sum(r["status"] == "running" for r in members),
        "seeds": list(by_seed),
        "duplicates": "; ".join(
            f"seed {seed}: jobs {' '.join(r['job'] for r in same)}" for seed, same in by_seed.items() if len(same) > 1
        ),
        "stats": stats,
    }


def _finite(rows: list[dict], name: str) -> list[float]:
    return [
        float(v)
        for r in rows
        if r["status"] == "done" and isinstance(v := r["metrics"].get(name), int | float) and math.isfinite(v)
    ]


def default_metrics(rows: list[dict]) -> list[str]:
    """The transfer gain and each stage's test accuracy, where the jobs have them."""
    names = {m for r in rows for m in r["metrics"]}
    return [m for m in ["gain/acc", *sorted(n for n in names if n.endswith("/test/acc"))] if m in names]


def write(
    sweep_dir: Path, rows: list[dict], metrics: list[str] | None = None, x: str | None = None, line: str | None = None
) -> list[Path]:
    """report.md (cells, then jobs), report.csv (jobs), report_cells.csv (cells) and one PNG per metric."""
    _check_writable(sweep_dir)
    swept = swept_keys(rows)
    keys = [k for k in swept if k != OVER]
    metrics = metrics or default_metrics(rows)
    _check_metrics(rows, metrics)
    cells = aggregate(rows, keys)
    job_header, job_table = _job_table(rows, swept)
    cell_header, cell_table = _cell_table(cells, keys, sorted({m for r in rows for m in r["metrics"]}))
    _write_csv(sweep_dir / "report.csv", job_header, job_table)
    _write_csv(sweep_dir / "report_cells.csv", cell_header, cell_table)
    shown = [i for i, name in enumerate(job_header) if i < 3 + len(swept) or name.endswith("/acc")]
    text = [
        f"# Sweep {sweep_dir}",
        "",
        f"## Mean ± standard deviation over `{OVER}` (n = distinct seeds with a value)",
        "",
        _cells_markdown(cells, keys, metrics),
        "",
        "## Jobs",
        "",
        markdown_table([job_header[i] for i in shown], [[row[i] for i in shown] for row in job_table]),
        *_notes(rows, cells),
    ]
    atomic_write(sweep_dir / "report.md", "\n".join(text) + "\n")
    plots = _plots(sweep_dir, cells, keys, metrics, x, line) if keys else []
    return [sweep_dir / "report.md", sweep_dir / "report.csv", sweep_dir / "report_cells.csv", *plots]


def _check_metrics(rows: list[dict], metrics: list[str]) -> None:
    unknown = [m for m in metrics if not any(m in r["metrics"] for r in rows)]
    if unknown:
        known = sorted({m for r in rows for m in r["metrics"]})
        raise UserError(
            f"metric(s) {', '.join(unknown)} are in no job's results.json; available: "
            f"{', '.join(known) or 'none (every job failed)'}."
        )


def _cells_markdown(cells: list[dict], keys: list[str], metrics: list[str]) -> str:
    """The cells' table; the config and running-jobs columns only where they say something."""
    config = ["config"] if any(c["config"] for c in cells) else []
    running = ["running jobs"] if any(c["running"] for c in cells) else []
    return markdown_table(
        [*keys, *config, "jobs", "failed jobs", *running, *metrics],
        [
            [
                *c["values"].values(),
                *([c["config"]] if config else []),
                c["jobs"],
                c["failed"],
                *([c["running"]] if running else []),
                *(_cell(c, m) for m in metrics),
            ]
            for c in cells
        ],
    )


def _notes(rows: list[dict], cells: list[dict]) -> list[str]:
    """The report's closing sections, each only where it has something to say: cells split by config or
    holding repeated seeds, running jobs, failed jobs and why."""
    notes = [
        f"- jobs {' '.join(c['job_names'])} ({_where(c)}): other jobs with the same overrides ran another config, "
        "so these are a cell of their own"
        for c in cells
        if c["config"]
    ] + [
        f"- {_where(c)}: jobs that ran the same seed ({c['duplicates']}) count once, as their mean"
        for c in cells
        if c["duplicates"]
    ]
    busy = [f"- job {r['job']}: a live run holds its folder; not averaged" for r in rows if r["status"] == "running"]
    failures = [
        f"- job {r['job']}: {r['reason'] or 'no results.json, and no live run holds its folder (failed, or killed)'}"
        for r in rows
        if r["status"] == "failed"
    ]
    sections = (("Notes", notes), ("Running jobs", busy), ("Failed jobs", failures))
    return [line for title, lines in sections if lines for line in ("", f"## {title}", "", *lines)]


def _plots(
    sweep_dir: Path, cells: list[dict], keys: list[str], metrics: list[str], x: str | None, line: str | None
) -> list[Path]:
    """One PNG per metric against swept key `x`, one line per value of `line` (defaults: the label count, or
    the first swept key; the next one)."""
    x = x or ("data.target.samples_per_class" if "data.target.samples_per_class" in keys else keys[0])
    line = line or next((k for k in keys if k != x), None)
    for key, what in ((x, "--x"), (line, "--line")):
        if key is not None and key not in keys:
            raise UserError(f"{what} {key}: not a key this sweep varies; swept keys: {', '.join(keys)}.")
    from transferlab.analysis.sweep_plot import plot  # matplotlib only when a plot is drawn

    return [plot(sweep_dir, cells, m, x, line) for m in metrics]


def _check_writable(sweep_dir: Path) -> None:
    """A sweep folder the report cannot be written into (a colleague's sweep, a read-only snapshot) is named before
    anything is written, instead of a traceback from the first write."""
    try:
        with tempfile.TemporaryFile(dir=sweep_dir):
            pass
    except OSError as err:
        raise UserError(
            f"the report goes into the sweep folder, and {sweep_dir} cannot be written to ({err.strerror}): report "
            f"on a copy you can write, e.g. rsync -a --exclude='*.ckpt' {sweep_dir}/ <copy>/"
        ) from None


def _job_table(rows: list[dict], swept: list[str]) -> tuple[list[str], list[list]]:
    names = sorted({k for r in rows for k in r["metrics"]})
    header = ["job", "status", *swept, "objective", *names]
    return header, [
        [
            r["job"],
            r["status"],
            *[r["overrides"].get(k, "") for k in swept],
            _fmt(r["objective"]),
            *[_fmt(r["metrics"].get(m)) for m in names],
        ]
        for r in rows
    ]


def _cell_table(cells: list[dict], keys: list[str], names: list[str]) -> tuple[list[str], list[list]]:
    stats = [f"{m} {s}" for m in names for s in ("mean", "std", "n")]
    header = [*keys, "config", "jobs", "failed", "running", OVER + "s", "duplicates", *stats]
    return header, [
        [
            *c["values"].values(),
            c["config"],
            c["jobs"],
            c["failed"],
            c["running"],
            " ".join(c["seeds"]),
            c["duplicates"],
            *[v for m in names for v in (_fmt(c["stats"][m]["mean"]), _fmt(c["stats"][m]["std"]), c["stats"][m]["n"])],
        ]
        for c in cells
    ]


def _cell(cell: dict, metric: str) -> str:
    s, seeds = cell["stats"][metric], len(cell["seeds"])
    if s["n"] == 0:
        return f"— (n=0 of {seeds})"
    spread = "" if s["n"] < 2 else f" ± {s['std']:.4f}"
    why = "".join(f", {k}={cell[k]}" for k in ("failed", "running") if cell[k])
    missing = "" if s["n"] == seeds else f" of {seeds}{why}"
    return f"{s['mean']:.4f}{spread} (n={s['n']}{missing})"


def _where(cell: dict) -> str:
    named = [*(f"{k}={v}" for k, v in cell["values"].items()), *([cell["config"]] if cell["config"] else [])]
    return ", ".join(named) or "all jobs"


def _write_csv(path: Path, header: list, table: list[list]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *table])
    atomic_write(path, buffer.getvalue())


def _fmt(value) -> str:
    if value is None:
        return ""
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


class ReportAtEnd(Callback):
    """`hydra.callbacks.report` in a sweep's config (see conf/experiment/lowdata_study.yaml): once every job
    has run, write and print the sweep's report, as `transferlab-report <sweep folder>` would."""

    def __init__(self, metrics: list[str] | None = None, x: str | None = None, line: str | None = None):
        self.metrics, self.x, self.line = metrics, x, line

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            rows = collect(sweep_dir)
            x, line = (k if k in swept_keys(rows) else None for k in (self.x, self.line))  # a narrowed sweep
            write(sweep_dir, rows, list(self.metrics or []) or None, x, line)
        except UserError as err:  # the jobs' results stay; the report can be made again with transferlab-report
            print(f"transferlab-report: error: {err}", file=sys.stderr)
            return
        print((sweep_dir / "report.md").read_text())
