"""The team server under load and faults, on loopback only, bounded: one command, a markdown report.

    python experiments/benchmarks/bench_team_server.py [--clients 4 --runs 10 --steps 20] [--skip-tune]

Starts the team setup with the script `make server` runs (PostgreSQL + moto S3 + `mlflow server`) in a temporary
folder, then:

1. load: N client processes log at once into the one server, each R runs of S steps x 2 metrics one call at a time
   (as `train` logs per epoch), a param, a tag and an artifact (proxied to S3). Checked: exactly N x R runs, each
   metric history exactly S points with the values sent, every artifact an object in the bucket.
2. server restart: one client logs a metric every 0.1 s; after step 10 the mlflow server is stopped and started
   again on the same port. Checked: the client finishes on its own (MLflow's HTTP retries), no step lost or doubled.
3. PostgreSQL restart under two `tune` workers sharing one Optuna study (and the MLflow server using the same
   database): after the first finished trial the database is stopped, held down --db-outage seconds (default 10)
   and started again on the same port. Checked: both workers' exit codes, the
   trials' states, duplicates among the finished configurations, and the MLflow runs the trials logged.

Every figure is printed with its bound (counts, timeouts); nothing is retried by this script.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
HERE = Path(__file__).resolve()


def client_main(uri: str, name: str, runs: int, steps: int, sleep: float, experiment_id: str) -> None:
    """One client process: its runs, one logging call at a time; prints a JSON summary last."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids, slowest, calls, slow, started = [], 0.0, 0, 0, time.perf_counter()
    for index in range(runs):
        run = client.create_run(experiment_id, run_name=f"{name}-{index}", tags={"client": name, "index": str(index)})
        run_id = run.info.run_id
        client.log_param(run_id, "client", name)
        for step in range(steps):
            for metric in ("loss", "accuracy"):
                t = time.perf_counter()
                client.log_metric(run_id, metric, value=step + (0.5 if metric == "loss" else 0.25), step=step)
                took = time.perf_counter() - t
                slowest, calls, slow = max(slowest, took), calls + 1, slow + (took > 1.0)
            print(f"step {step}", flush=True)
            time.sleep(sleep)
        client.log_text(run_id, f"{name} run {index}", "note.txt")
        client.set_terminated(run_id)
        ids.append(run_id)
    print(json.dumps({"client": name, "run_ids": ids, "calls": calls, "slowest_call_s": slowest, "calls_over_1s": slow,
                      "seconds": time.perf_counter() - started}), flush=True)


def clean_client_env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3_", "MLFLOW_TRACKING_"))}
    env.update(MLFLOW_TRACKING_URI=uri, TQDM_DISABLE="1", MLFLOW_DISABLE_TELEMETRY="true")
    return env


def spawn_client(uri: str, name: str, runs: int, steps: int, sleep: float, experiment_id: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), "--client", name, "--uri", uri, "--runs", str(runs),
                             "--steps", str(steps), "--sleep", str(sleep), "--experiment-id", experiment_id],
                            env=clean_client_env(uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def summary_of(process: subprocess.Popen, timeout: float) -> dict:
    out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        return {"failed": (err.strip().splitlines() or ["no output"])[-1], "returncode": process.returncode}
    return json.loads(out.strip().splitlines()[-1])


def check_runs(client, run_ids: list[str], steps: int, keys: list[str]) -> dict:
    """Lost or doubled points, runs not finished, artifacts missing: each counted."""
    lost = doubled = wrong = unfinished = no_artifact = 0
    for run_id in run_ids:
        run = client.get_run(run_id)
        unfinished += run.info.status != "FINISHED"
        for metric, offset in (("loss", 0.5), ("accuracy", 0.25)):
            history = client.get_metric_history(run_id, metric)
            seen = [m.step for m in history]
            lost += len(set(range(steps)) - set(seen))
            doubled += len(seen) - len(set(seen))
            wrong += sum(m.value != m.step + offset for m in history)
        no_artifact += not any(k.endswith(f"{run_id}/artifacts/note.txt") for k in keys)
    return {"lost_points": lost, "doubled_points": doubled, "wrong_values": wrong, "unfinished_runs": unfinished,
            "missing_artifacts": no_artifact}


def load(server, uri: str, clients: int, runs: int, steps: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("load")
    started = time.perf_counter()
    processes = [spawn_client(uri, f"c{i}", runs, steps, 0.0, experiment_id) for i in range(clients)]
    summaries = [summary_of(p, timeout=900) for p in processes]
    seconds = time.perf_counter() - started
    failed = [s["failed"] for s in summaries if "failed" in s]
    run_ids = [run_id for s in summaries for run_id in s.get("run_ids", [])]
    stored = client.search_runs([experiment_id], max_results=5000)
    pairs = [(r.data.tags.get("client"), r.data.tags.get("index")) for r in stored]
    calls = sum(s.get("calls", 0) for s in summaries)
    return {"clients": clients, "runs_sent": clients * runs, "runs_stored": len(stored),
            "duplicate_runs": len(pairs) - len(set(pairs)), "client_failures": failed,
            "metric_calls": calls, "seconds": seconds, "calls_per_s": calls / seconds,
            "slowest_call_s": max((s.get("slowest_call_s", 0) for s in summaries), default=0),
            "calls_over_1s": sum(s.get("calls_over_1s", 0) for s in summaries),
            **check_runs(client, run_ids, steps, server.artifact_keys())}


def restart_mid_run(server, uri: str, steps: int = 40) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("restart")
    process = spawn_client(uri, "r", 1, steps, 0.1, experiment_id)
    for line in process.stdout:  # the client's progress; the restart lands after step 10
        if line.startswith("step 10"):
            break
    down = time.perf_counter()
    server.stop_mlflow()
    stopped = time.perf_counter() - down
    server.start_mlflow()
    outage = time.perf_counter() - down
    rest, err = process.communicate(timeout=600)
    if process.returncode != 0:
        return {"outage_s": outage, "client_failed": (err.strip().splitlines() or ["?"])[-1]}
    summary = json.loads(rest.strip().splitlines()[-1])
    return {"outage_s": outage, "stop_s": stopped, "client_exit": process.returncode,
            "calls_over_1s": summary["calls_over_1s"],
            "slowest_call_s": summary["slowest_call_s"], "steps": steps,
            **check_runs(client, summary["run_ids"], steps, server.artifact_keys())}


def postgres_restart_under_tune(server, uri: str, work: Path, hold_down: float, trials: int = 6) -> dict:
    import optuna

    from bin_counter.commands.prepare import build_data_dir
    from bin_counter.config import PrepareConfig

    data = work / "data"
    build_data_dir(PrepareConfig(source="sample", out=str(data), split=(0.6, 0.2, 0.2), limit_per_class=12, workers=2))
    storage = server.pg_url("optuna")
    command = [sys.executable, "-m", "bin_counter", "tune", "--recipe", "study", "--data", str(data), "--head", "sgd",
               "--image-size", "224",
               "--feature-views", "1", "--num-workers", "0", "--cache-dir", str(work / "cache"),
               "--n-trials", str(trials), "--batch-size-range", "8,16", "--epochs-range", "2,4",
               "--storage", storage, "--study-name", "faults"]
    env = {**clean_client_env(uri), "PGPASSFILE": str(server.pgpass)}
    os.environ["PGPASSFILE"] = str(server.pgpass)
    started = time.perf_counter()
    workers = [subprocess.Popen(command, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    restart_at = outage = None
    deadline = time.time() + 600
    while time.time() < deadline and all(w.poll() is None for w in workers):
        try:
            study = optuna.load_study(study_name="faults", storage=storage)
            if any(t.state in finished_states for t in study.trials):
                from tools.team_server import postgres_bindir

                down = time.perf_counter()
                server.stop_postgres(postgres_bindir())
                time.sleep(hold_down)  # a restart alone takes well under a second: hold it down as a failover would
                server.start_postgres(postgres_bindir(), server.state()["pg_port"])
                restart_at, outage = down - started, time.perf_counter() - down
                break
        except Exception:  # the study does not exist until a worker creates it
            pass
        time.sleep(1)
    errors = [w.communicate(timeout=900)[1] for w in workers]
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name="faults", storage=storage)
    finished = [t for t in study.trials if t.state in finished_states]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    trial_runs = [r for r in client.search_runs(experiments, max_results=5000) if "trial_state" in r.data.tags]
    return {"trials": trials, "restart_after_s": restart_at, "db_outage_s": outage, "seconds": seconds,
            "worker_exits": [w.returncode for w in workers],
            "worker_errors": [(e.strip().splitlines() or [""])[-1] for w, e in zip(workers, errors) if w.returncode],
            "storage_retries": sum(e.count("Optuna storage unreachable") for e in errors),
            "states": {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState
                       if any(t.state == s for t in study.trials)},
            "finished": len(finished),
            "duplicate_configurations": len(finished) - len({tuple(sorted(t.params.items())) for t in finished}),
            "trial_runs_in_mlflow": len(trial_runs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--runs", type=int, default=10, help="runs per client")
    parser.add_argument("--steps", type=int, default=20, help="steps per run (2 metrics each)")
    parser.add_argument("--phases", default="load,restart,tune", help="which of load,restart,tune to run")
    parser.add_argument("--db-outage", type=float, default=10.0, help="seconds PostgreSQL stays down (tune phase)")
    # the client process
    parser.add_argument("--client")
    parser.add_argument("--uri")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--experiment-id")
    args = parser.parse_args()
    if args.client:
        client_main(args.uri, args.client, args.runs, args.steps, args.sleep, args.experiment_id)
        return

    import logging

    from tools.team_server import TeamServer

    # the sagemaker-mlflow plugin's header provider raises on every non-SageMaker tracking URI; MLflow only warns
    logging.getLogger("mlflow.tracking.request_header.registry").setLevel(logging.ERROR)

    root = Path(tempfile.mkdtemp(prefix="bench-team-"))
    root.chmod(0o711)  # PostgreSQL runs as the postgres user, which must reach its data folder
    server = TeamServer(root / "server")
    try:
        t = time.perf_counter()
        uri = server.start()
        print(f"team server up in {time.perf_counter() - t:.1f} s at {uri} ({os.cpu_count()} CPUs)", flush=True)
        results = {}
        phases = args.phases.split(",")
        if "load" in phases:
            results["load"] = load(server, uri, args.clients, args.runs, args.steps)
            print(json.dumps(results["load"]), flush=True)
        if "restart" in phases:
            results["restart"] = restart_mid_run(server, uri)
            print(json.dumps(results["restart"]), flush=True)
        if "tune" in phases:
            results["tune"] = postgres_restart_under_tune(server, uri, root, args.db_outage)
            print(json.dumps(results["tune"]), flush=True)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    report(results, args)


def report(results: dict, args) -> None:
    print()
    print("| experiment | bound | result |")
    print("|---|---|---|")
    if "load" in results:
        ld = results["load"]
        print(f"| {ld['clients']} clients logging at once | {ld['runs_sent']} runs x {args.steps} steps x 2 metrics, "
              f"one call each | {ld['runs_stored']} runs stored, {ld['duplicate_runs']} duplicate, "
              f"{ld['lost_points']} points lost, {ld['doubled_points']} doubled, {ld['wrong_values']} wrong, "
              f"{ld['missing_artifacts']} artifacts missing, {len(ld['client_failures'])} client failures; "
              f"{ld['metric_calls']} metric calls in {ld['seconds']:.1f} s = {ld['calls_per_s']:.0f} calls/s, "
              f"slowest call {ld['slowest_call_s']:.2f} s, {ld['calls_over_1s']} calls over 1 s |")
    rs = results.get("restart", {})
    if "client_failed" in rs:
        print(f"| mlflow server restarted mid-run | 1 run, 40 steps | client failed: {rs['client_failed']} |")
    elif rs:
        print(f"| mlflow server restarted mid-run | 1 run, {rs['steps']} steps, restart after step 10 | outage "
              f"{rs['outage_s']:.1f} s; client exit {rs['client_exit']}, longest call {rs['slowest_call_s']:.1f} s "
              f"({rs['calls_over_1s']} calls over 1 s); {rs['lost_points']} points lost, "
              f"{rs['doubled_points']} doubled, {rs['unfinished_runs']} runs unfinished |")
    if "tune" in results:
        tu = results["tune"]
        print(f"| PostgreSQL restarted under 2 tune workers | {tu['trials']} trials, restart after the first "
              f"finished, held down {args.db_outage:.0f} s | restart at {tu['restart_after_s'] or 0:.0f} s, "
              f"database down {tu['db_outage_s'] or 0:.1f} s; worker exits {tu['worker_exits']}, "
              f"{tu['storage_retries']} storage retries logged; trial states {tu['states']}; "
              f"{tu['duplicate_configurations']} duplicate configurations; "
              f"{tu['trial_runs_in_mlflow']} trial runs in MLflow; {tu['seconds']:.0f} s |")
        errors = [e for e in tu["worker_errors"] if e]
        if errors:
            print(f"\nworker errors: {errors}")


if __name__ == "__main__":
    main()
