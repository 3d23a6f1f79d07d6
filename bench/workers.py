"""The benchmark's variants, each run in its own process by bench/run_bench.py.

    python bench/workers.py VARIANT DATABASE_URL MONTH_DIR AS_OF [WORK_DIR]

VARIANT is one of
  baseline  (a) the lab's reference way: pandas.read_csv + DataFrame.to_sql into a
                scratch table + INSERT ... ON CONFLICT DO UPDATE into the live table
  floor     (b) a bare COPY of each file into the live tables (what ``\\copy`` does)
  core      (c0) the flow's own body (ingest_flow.ingest_month) with Prefect bypassed:
                the same streamflow code, no task/flow engine, no API; submitted
                tasks run on a thread pool as wide as the flow's task runner
  dlt       (d) dlt 1.31: pyarrow CSV reader -> parquet -> ADBC COPY -> MERGE upsert
                with skip_unchanged_rows
  dlt-unique (d+) the same with a UNIQUE constraint on user_id

The last stdout line is ``BENCH_RESULT {json}``: ``work`` is the seconds spent after
imports (the driver measures the process's wall time and peak RSS itself).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOW_DIR = Path(os.environ.get("BENCH_FLOW_DIR", REPO / "services" / "prefect"))
sys.path.insert(0, str(FLOW_DIR))

_T0 = time.perf_counter()


def _emit(**result: object) -> None:
    print("BENCH_RESULT " + json.dumps(result, default=str), flush=True)


def _sqlalchemy_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


# ---------------------------------------------------------------------------
# (a) the lab's reference way
# ---------------------------------------------------------------------------
def baseline(url: str, month: Path, as_of: str) -> dict:
    """Per table: read_csv -> to_sql (scratch table) -> INSERT ... ON CONFLICT DO UPDATE.

    Reimplemented the way the lab notebook does it: the whole file in a DataFrame,
    pandas' default to_sql (executemany), every column rewritten on conflict. It
    writes live tables only: no validation, no history, no ledger.
    """
    import pandas as pd
    import sqlalchemy as sa
    from psycopg import sql
    from streamflow.registry import TABLES

    imported = time.perf_counter()
    engine = sa.create_engine(_sqlalchemy_url(url))
    rows = {}
    for spec in TABLES:  # parents first, for the foreign keys
        df = pd.read_csv(month / spec.file_name)
        scratch = f"tmp_{spec.name}"
        with engine.begin() as conn:
            df.to_sql(scratch, conn, if_exists="replace", index=False)
            cols = spec.column_names
            values = spec.value_columns
            stmt = sql.SQL(
                "INSERT INTO {live} ({cols}) SELECT {casts} FROM {scratch} "
                "ON CONFLICT (user_id) DO UPDATE SET {sets}"
            ).format(
                live=sql.Identifier(spec.name),
                cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
                casts=sql.SQL(", ").join(
                    sql.SQL("{}::{}").format(sql.Identifier(c), sql.SQL(spec.column(c).pg_type))
                    for c in cols
                ),
                scratch=sql.Identifier(scratch),
                sets=sql.SQL(", ").join(
                    sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c)) for c in values
                ),
            )
            raw = conn.connection.dbapi_connection
            with raw.cursor() as cur:
                cur.execute(stmt)
                rows[spec.name] = cur.rowcount
                cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(scratch)))
        del df
    engine.dispose()
    return {"work": time.perf_counter() - imported, "rows": rows}


# ---------------------------------------------------------------------------
# (b) the floor
# ---------------------------------------------------------------------------
def floor(url: str, month: Path, as_of: str) -> dict:
    """COPY each file, streamed in 1 MiB chunks, into the live table (PK + FK), as \\copy."""
    import psycopg
    from psycopg import sql
    from streamflow.registry import TABLES

    imported = time.perf_counter()
    rows = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for spec in TABLES:
            path = month / spec.file_name
            with path.open("rb") as f:
                # Column names from the registry, never from the file: the header
                # is only checked to be the one the generator writes.
                header = tuple(f.readline().decode().strip().split(","))
                if header != spec.column_names:
                    raise SystemExit(f"{path}: header {header}, expected {spec.column_names}")
                stmt = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
                    sql.Identifier(spec.name),
                    sql.SQL(", ").join(map(sql.Identifier, spec.column_names)),
                )
                with conn.cursor() as cur:
                    with cur.copy(stmt) as cp:
                        while chunk := f.read(1 << 20):
                            cp.write(chunk)
                    rows[spec.name] = cur.rowcount
    return {"work": time.perf_counter() - imported, "rows": rows}


# ---------------------------------------------------------------------------
# (c0) the pipeline without Prefect
# ---------------------------------------------------------------------------
def core(url: str, month: Path, as_of: str) -> dict:
    """Run ingest_flow.ingest_month's body with its tasks as plain functions.

    Same code as the CLI (stage, validate, publish, snapshot, ledger); only Prefect's
    engine is out of the way: no flow/task runs, no API server, no artifacts (publishing
    them is a no-op outside a flow run).
    """
    os.environ["DATABASE_URL"] = url
    from concurrent.futures import ThreadPoolExecutor

    import ingest_flow
    from prefect import Task

    imported = time.perf_counter()
    log = logging.getLogger("streamflow.bench")
    ingest_flow.get_run_logger = lambda: log
    runner = getattr(ingest_flow.ingest_month, "task_runner", None)
    workers = getattr(runner, "_max_workers", None) or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, value in list(vars(ingest_flow).items()):
            if isinstance(value, Task):
                setattr(ingest_flow, name, _PlainTask(value.fn, pool))
        result = ingest_flow.ingest_month.fn(seed_dir=str(month), as_of=as_of)
    return {"work": time.perf_counter() - imported, "import": imported - _T0, "flow": result}


class _PlainTask:
    """A Prefect task's function, callable and ``.submit``-able without Prefect.

    ``submit`` runs it on a thread pool as wide as the flow's ThreadPoolTaskRunner,
    so the flow body keeps its concurrency; the future has ``result()`` and ``wait()``.
    """

    def __init__(self, fn, pool) -> None:
        self.fn, self.pool = fn, pool

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def submit(self, *args, **kwargs):
        return _Future(self.pool.submit(self.fn, *args, **kwargs))


class _Future:
    def __init__(self, future) -> None:
        self._future = future

    def result(self, timeout: float | None = None, raise_on_failure: bool = True):
        return self._future.result(timeout)

    def wait(self, timeout: float | None = None) -> None:
        from concurrent.futures import wait

        wait([self._future], timeout)

    def add_done_callback(self, fn) -> None:
        self._future.add_done_callback(lambda _: fn(self))


# ---------------------------------------------------------------------------
# (d) the peer: dlt
# ---------------------------------------------------------------------------
def dlt_peer(url: str, month: Path, as_of: str, work_dir: Path, unique: bool = False) -> dict:
    """dlt's fastest documented PostgreSQL path for files like these.

    pyarrow's streaming CSV reader yields record batches (typed explicitly, empty
    cell = NULL, as the pipeline does); dlt writes them as parquet and the postgres
    destination COPYs parquet through ADBC (adbc-driver-postgresql), then MERGEs
    the staging dataset with the ``upsert`` strategy, skipping unchanged rows.

    dlt creates no index for ``primary_key`` on postgres; ``unique=True`` adds the
    ``unique`` column hint, which it turns into a UNIQUE constraint (an index like
    the pipeline's primary keys).
    """
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
    import dlt
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from streamflow.registry import TABLES

    arrow_types = {
        "text": pa.string(),
        "date": pa.date32(),
        "boolean": pa.bool_(),
        "integer": pa.int64(),
        "numeric": pa.float64(),
    }

    def reader(spec):
        def read_batches():
            convert = pacsv.ConvertOptions(
                column_types={c.name: arrow_types[c.pg_type] for c in spec.columns},
                true_values=["True"],
                false_values=["False"],
                strings_can_be_null=True,
            )
            with pacsv.open_csv(month / spec.file_name, convert_options=convert) as batches:
                yield from batches

        return dlt.resource(
            read_batches,
            name=spec.name,
            primary_key="user_id",
            write_disposition={
                "disposition": "merge",
                "strategy": "upsert",
                "skip_unchanged_rows": True,
            },
            file_format="parquet",
            columns={"user_id": {"unique": True}} if unique else None,
        )

    imported = time.perf_counter()
    pipeline = dlt.pipeline(
        pipeline_name="streamflow_bench",
        destination=dlt.destinations.postgres(credentials=url),
        dataset_name="streamflow",
        pipelines_dir=str(work_dir),
    )
    info = pipeline.run([reader(spec) for spec in TABLES], loader_file_format="parquet")
    info.raise_on_failed_jobs()
    rows = {t: n for t, n in pipeline.last_trace.last_normalize_info.row_counts.items()}
    return {"work": time.perf_counter() - imported, "rows": rows}


def main(argv: list[str]) -> int:
    variant, url, month, as_of = argv[:4]
    work_dir = Path(argv[4]) if len(argv) > 4 else None
    month_dir = Path(month)
    if variant == "baseline":
        result = baseline(url, month_dir, as_of)
    elif variant == "floor":
        result = floor(url, month_dir, as_of)
    elif variant == "core":
        result = core(url, month_dir, as_of)
    elif variant in ("dlt", "dlt-unique"):
        assert work_dir is not None, "dlt needs a work dir for its pipeline state"
        result = dlt_peer(url, month_dir, as_of, work_dir, unique=variant == "dlt-unique")
    else:
        print(f"unknown variant {variant!r}", file=sys.stderr)
        return 2
    _emit(**result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
