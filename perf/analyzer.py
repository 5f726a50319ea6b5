"""perf_analyzer sweeps: one perf_analyzer run per concurrency (or request rate) level, its CSV rows
saved together and turned into a table with the server-side split."""

from __future__ import annotations

import csv
import io
import logging
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sweep:
    model: str
    url: str  # host:port of Triton's gRPC (or HTTP, with protocol="http") endpoint
    input_data: Path | None = None  # None: perf_analyzer's random data
    batch_size: int = 1
    concurrency: tuple[int, ...] = (1,)
    request_rates: tuple[float, ...] = ()  # when set, used instead of concurrency
    measurement_ms: int = 5000
    stability_percentage: int = 10
    max_trials: int = 10
    protocol: str = "grpc"
    extra_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {self.protocol!r}")
        if not self.request_rates and not self.concurrency:
            raise ValueError("concurrency or request_rates: give at least one level")
        if any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if any(r <= 0 for r in self.request_rates):
            raise ValueError(f"request rates must be > 0, got {self.request_rates}")
        if self.batch_size < 1 or self.measurement_ms < 100:
            raise ValueError("batch_size must be >= 1 and measurement_ms >= 100")

    @property
    def levels(self) -> list[tuple[str, float]]:
        if self.request_rates:
            return [("request-rate", r) for r in self.request_rates]
        return [("concurrency", float(c)) for c in self.concurrency]

    def command(self, perf_analyzer: Path, mode: str, level: float, csv_path: Path) -> list[str]:
        value = f"{level:g}"
        command = [
            str(perf_analyzer),
            "-m",
            self.model,
            "-u",
            self.url,
            "-i",
            self.protocol,
            "-b",
            str(self.batch_size),
            f"--{mode}-range",
            f"{value}:{value}",
            "--measurement-interval",
            str(self.measurement_ms),
            "--stability-percentage",
            str(self.stability_percentage),
            "--max-trials",
            str(self.max_trials),
            "-f",
            str(csv_path),
        ]
        if self.input_data is not None:
            command += ["--input-data", str(self.input_data)]
        return command + list(self.extra_args)


@dataclass(frozen=True)
class Row:
    """One level's result; times in milliseconds, throughput in inferences (samples) per second."""

    mode: str
    level: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    client_send_ms: float
    network_ms: float  # network + server send/receive
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    client_recv_ms: float


_US_COLUMNS = {
    "p50_ms": "p50 latency",
    "p90_ms": "p90 latency",
    "p95_ms": "p95 latency",
    "p99_ms": "p99 latency",
    "client_send_ms": "Client Send",
    "network_ms": "Network+Server Send/Recv",
    "queue_ms": "Server Queue",
    "compute_input_ms": "Server Compute Input",
    "compute_infer_ms": "Server Compute Infer",
    "compute_output_ms": "Server Compute Output",
    "client_recv_ms": "Client Recv",
}


def parse_csv(text: str, mode: str) -> list[Row]:
    """perf_analyzer's `-f` CSV (times in microseconds) as rows."""
    rows = []
    for record in csv.DictReader(io.StringIO(text)):
        level_key = "Concurrency" if mode == "concurrency" else "Request Rate"
        missing = [c for c in (level_key, "Inferences/Second", *_US_COLUMNS.values()) if c not in record]
        if missing:
            raise ValueError(f"perf_analyzer CSV lacks columns {missing}; has {list(record)}")
        rows.append(
            Row(
                mode=mode,
                level=float(record[level_key]),
                throughput=float(record["Inferences/Second"]),
                **{key: float(record[column]) / 1000.0 for key, column in _US_COLUMNS.items()},
            )
        )
    return rows


def run_sweep(sweep: Sweep, perf_analyzer: Path, out_dir: Path, timeout_s: float = 600.0) -> list[Row]:
    """Run perf_analyzer once per level; save `<model>.csv` (all levels) and each run's log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    header, lines = "", []
    for i, (mode, level) in enumerate(sweep.levels, 1):
        csv_path = out_dir / f"{sweep.model}-{mode}-{level:g}.csv"
        log.info("perf_analyzer %s: %s %g (%d/%d)", sweep.model, mode, level, i, len(sweep.levels))
        done = subprocess.run(
            sweep.command(perf_analyzer, mode, level, csv_path),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        (out_dir / f"{csv_path.stem}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not csv_path.is_file():
            raise RuntimeError(
                f"perf_analyzer failed on {sweep.model} at {mode} {level:g} (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-1500:]}"
            )
        text = csv_path.read_text()
        rows += parse_csv(text, mode)
        header, *body = text.strip().splitlines()
        lines += body
    (out_dir / f"{sweep.model}.csv").write_text("\n".join([header, *lines]) + "\n")
    return rows


def table(rows: list[Row], batch_size: int = 1) -> str:
    """A plain-text table: throughput, latency percentiles and the server-side split."""
    head = (
        f"{'level':>8} {'infer/s':>9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
        f"{'queue':>8} {'c.input':>8} {'c.infer':>8} {'c.output':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.level:>8g} {r.throughput:>9.2f} {r.p50_ms:>9.1f} {r.p90_ms:>9.1f} {r.p99_ms:>9.1f} "
            f"{r.queue_ms:>8.2f} {r.compute_input_ms:>8.2f} {r.compute_infer_ms:>8.2f} "
            f"{r.compute_output_ms:>8.2f}"
        )
    note = f"(batch {batch_size}: infer/s counts samples)" if batch_size > 1 else ""
    return "\n".join(lines + ([note] if note else []))


def rows_as_dicts(rows: list[Row]) -> list[dict[str, float | str]]:
    return [asdict(r) for r in rows]
