"""What the experiment trackers wrote, read back with their own tools: MLflow's client on a run's store, the MLflow
server started on it (its REST API), and W&B's offline transaction log (`run-<id>.wandb`) decoded into W&B's own
protobuf records."""

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path


def store_uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store_uri(store))


def mlflow_runs(store: Path, experiment: str) -> list:
    """Every run of the experiment named `experiment`, parents and nested runs alike."""
    client = mlflow_client(store)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {store}"
    return client.search_runs([found.experiment_id], max_results=1000)


def parents_and_children(runs: list) -> tuple[list, dict]:
    """(the runs without a parent, {parent id: {run name: nested run}})."""
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children: dict = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            children.setdefault(r.data.tags["mlflow.parentRunId"], {})[r.info.run_name] = r
    return parents, children


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(store: Path):
    """`mlflow server` on the store, on a free port of 127.0.0.1; yields its address; stopped at the end."""
    program = "import flask, mlflow.server"  # the full mlflow package: mlflow-skinny has no server
    missing = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert missing.returncode == 0, (
        "`mlflow server` needs the full mlflow package (the dev extra brings it; pip install mlflow):\n"
        + missing.stderr[-500:]
    )
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri(store)]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"mlflow server exited {proc.returncode}: {proc.stderr.read()[-3000:]}"
            try:
                urllib.request.urlopen(f"{address}/health", timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not answer within 120 s"
                time.sleep(0.5)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rest(address: str, path: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API (POST with a JSON body, or GET)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{address}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


# -- W&B's offline files --------------------------------------------------------------------------------------
BLOCK, HEADER = 32768, 7  # the transaction log's block and record-header sizes (LevelDB's log format)


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (`offline-run-*/run-<id>.wandb`), each a `wandb_internal_pb2.Record`:
    the file header (`:W&B`, magic 0xBEE1), then LevelDB-log blocks of chunks (full, first, middle, last), each chunk
    CRC-32 checked."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER]) if left >= HEADER else (0, 0, 0)
        if left < HEADER or (kind == 0 and length == 0):  # the rest of a block is padding
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: a chunk's checksum at {pos}"
        pos, pending = pos + HEADER + length, pending + chunk
        if kind in (1, 4):  # a full record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(stage_dir: Path) -> dict:
    """The one offline W&B run under `<stage>/wandb/`: its run record (id, group, job type) and its history rows."""
    [log] = sorted(stage_dir.glob("wandb/offline-run-*/run-*.wandb"))
    records = wandb_records(log)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return {
        "id": run.run_id,
        "group": run.run_group,
        "job_type": run.job_type,
        "name": run.display_name,
        "project": run.project,
        "history": history,
    }
