"""team_server: the team setup on one machine — an MLflow tracking server on PostgreSQL with S3 artifacts.

    python tools/team_server.py start [--dir .team-server] [--artifacts-destination s3://bucket/prefix]
    python tools/team_server.py stop  [--dir .team-server]
    python tools/team_server.py status [--dir .team-server]

`start` installs Debian's postgresql if it is missing (apt, as root), runs `initdb` into DIR/pg and PostgreSQL on
a free loopback port (as the `postgres` user when we are root: PostgreSQL refuses to run as root), creates the
`mlflow` and `optuna` databases, starts a moto S3 server on loopback with a bucket (unless a real
--artifacts-destination is given) and `mlflow server --backend-store-uri postgresql://... --artifacts-destination
s3://...` in the background. Only the server gets the S3 endpoint and credentials: clients reach artifacts through
the server's proxy (`mlflow-artifacts:/`). Every process started is recorded in DIR/pids/ and `stop` stops exactly
those. The last line `start` prints is `export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT`.

The database password is generated, kept in DIR/pgpass (mode 0600) and handed to libpq with PGPASSFILE, so it never
appears in a URI, a command line or a log. The server runs MLflow's basic-auth app; its admin password is generated
likewise (DIR/admin-password), and clients read it with the URI from DIR/env (0600).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bin_counter import BinCounterError, one_line

DEFAULT_DIR = ".team-server"
BUCKET = "mlflow-team"
PG_USER = "postgres"  # the database superuser; also the OS user the server runs as when we are root
DATABASES = ("mlflow", "optuna", "mlflow_auth")  # mlflow_auth: the basic-auth app's users and permissions
ADMIN = "admin"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# what each recorded pid's command line must contain before we signal it: a pid reused by another program is left alone
MARKERS = {"mlflow": "mlflow", "moto": "moto", "postgres": "postgres"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeamServer:
    def __init__(self, directory: str | os.PathLike = DEFAULT_DIR):
        self.dir = Path(directory).resolve()
        self.pg_dir = self.dir / "pg"
        self.pg_data = self.pg_dir / "data"
        self.pids = self.dir / "pids"
        self.logs = self.dir / "logs"
        self.state_file = self.dir / "state.json"
        self.pgpass = self.dir / "pgpass"
        self.admin_password_file = self.dir / "admin-password"  # the server's admin, as MLflow's basic auth knows it

    # ---- state -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def save_state(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=1))

    def pid(self, name: str) -> int | None:
        """The recorded pid of `name` if that process is still the one we started: the same start time (a reused
        pid has another) and a command line of its kind."""
        try:
            recorded = (self.pids / f"{name}.pid").read_text().split()
            pid = int(recorded[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            return None
        same_process = len(recorded) > 1 and recorded[1] == start_time(pid)
        return pid if same_process and MARKERS[name] in cmdline else None

    def record_pid(self, name: str, pid: int) -> None:
        (self.pids / f"{name}.pid").write_text(f"{pid} {start_time(pid)}\n")

    def running(self) -> dict[str, int | None]:
        return {name: self.pid(name) for name in MARKERS}

    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.state()['mlflow_port']}"

    def pg_url(self, database: str) -> str:
        """A libpq URL without a password: libpq reads it from PGPASSFILE (see `client_env`)."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.state()['pg_port']}/{database}"

    def artifact_keys(self) -> list[str]:
        """Every object in the artifact bucket: where runs and models really landed."""
        import boto3

        state = self.state()
        s3 = boto3.client("s3", endpoint_url=state["s3_endpoint"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # moto's, not AWS's
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=state["bucket"])
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def admin_password(self) -> str:
        """Generated with the database (its users live there), kept in a 0600 file, never in a URI."""
        if not self.admin_password_file.exists():
            write_private(self.admin_password_file, secrets.token_urlsafe(24) + "\n")
        return self.admin_password_file.read_text().strip()

    def client_env(self) -> dict[str, str]:
        """What a client (tune workers, a benchmark) needs besides MLFLOW_TRACKING_URI: the password file and the
        server's credentials, which MLflow's client sends as HTTP basic auth."""
        return {"PGPASSFILE": str(self.pgpass), "MLFLOW_TRACKING_URI": self.tracking_uri(),
                "MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": self.admin_password()}

    # ---- PostgreSQL --------------------------------------------------------------------------------------

    def as_pg_user(self) -> dict:
        """Popen arguments that drop root for PostgreSQL (it refuses to run as root), supplementary groups too."""
        if os.geteuid() != 0:
            return {}
        return {"user": PG_USER, "group": PG_USER, "extra_groups": []}

    def pg_env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.pg_dir), "LC_ALL": "C"}

    def init_postgres(self, bindir: Path) -> None:
        """A fresh cluster in DIR/pg/data owned by the postgres user, password auth on loopback only."""
        if self.pg_dir.exists():
            shutil.rmtree(self.pg_dir)
        self.pg_dir.mkdir(parents=True)
        password = secrets.token_urlsafe(24)
        write_private(self.pgpass, f"127.0.0.1:*:*:{PG_USER}:{password}\n")
        self.admin_password_file.unlink(missing_ok=True)  # a new user store: a new admin
        pwfile = self.pg_dir / "pwfile"
        write_private(pwfile, password + "\n")
        if os.geteuid() == 0:
            check_traversable(self.pg_dir)
            import pwd

            try:
                entry = pwd.getpwnam(PG_USER)
            except KeyError:
                raise BinCounterError(f"PostgreSQL refuses to run as root and there is no `{PG_USER}` user to run "
                                      "it as (Debian's postgresql package creates it)") from None
            for path in (self.pg_dir, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        try:
            run([str(bindir / "initdb"), "-D", str(self.pg_data), "-U", PG_USER, "--pwfile", str(pwfile),
                 "--auth", "scram-sha-256", "-E", "UTF8", "--no-locale"],
                "initdb", cwd=self.pg_dir, env=self.pg_env(), **self.as_pg_user())
        finally:
            pwfile.unlink(missing_ok=True)

    def start_postgres(self, bindir: Path, port: int) -> None:
        options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.pg_dir}"
        run([str(bindir / "pg_ctl"), "-D", str(self.pg_data), "-l", str(self.pg_dir / "postgres.log"),
             "-o", options, "-w", "-t", "60", "start"],
            "pg_ctl start", cwd=self.pg_dir, env=self.pg_env(), start_new_session=True, **self.as_pg_user())
        self.record_pid("postgres", int((self.pg_data / "postmaster.pid").read_text().split()[0]))

    def create_databases(self, port: int) -> None:
        import psycopg

        connection = None
        for _ in range(20):  # pg_ctl -w returns when it accepts connections; a busy machine can still refuse once
            try:
                connection = psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres",
                                             passfile=str(self.pgpass), connect_timeout=5, autocommit=True)
                break
            except psycopg.OperationalError as exc:
                error = exc
                time.sleep(0.5)
        if connection is None:
            raise BinCounterError(f"PostgreSQL started but refuses connections: {one_line(error)}")
        with connection.cursor() as cursor:
            for name in DATABASES:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()

    def stop_postgres(self, bindir: Path | None) -> bool:
        pid = self.pid("postgres")
        if pid is None:
            return False
        if bindir is not None and self.pg_data.exists():
            # pg_ctl's fast shutdown waits for a clean stop; the signal below matters only if pg_ctl could not run
            subprocess.run([str(bindir / "pg_ctl"), "-D", str(self.pg_data), "-m", "fast", "-w", "-t", "60", "stop"],
                           cwd=self.pg_dir, env=self.pg_env(), capture_output=True, **self.as_pg_user())
        stop_pid(pid, group=False)
        return True

    def restart_postgres(self) -> None:
        """Stop and start the same cluster on the same port (the fault experiment's database restart)."""
        bindir = postgres_bindir()
        self.stop_postgres(bindir)
        self.start_postgres(bindir, self.state()["pg_port"])

    # ---- moto and MLflow ---------------------------------------------------------------------------------

    def start_moto(self, port: int) -> str:
        script = Path(sys.executable).parent / "moto_server"
        command = [str(script)] if script.exists() else [sys.executable, "-c",
                                                         "import sys; from moto.server import main; sys.exit(main())"]
        endpoint = f"http://127.0.0.1:{port}"
        self.spawn("moto", [*command, "-H", "127.0.0.1", "-p", str(port)], os.environ.copy())
        wait_http(endpoint + "/moto-api/", 60, "moto", self)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        return endpoint

    def mlflow_env(self) -> dict[str, str]:
        """The server's environment: the only process that holds the S3 endpoint and credentials."""
        state = self.state()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(PGPASSFILE=str(self.pgpass), MLFLOW_DISABLE_TELEMETRY="true",
                   # basic auth: the admin is created on the first start, in the mlflow_auth database
                   MLFLOW_AUTH_CONFIG_PATH=str(self.write_auth_config()), MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,
                   MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password(),
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(32))
        # the job runner (GenAI evaluation jobs, seven huey processes) does nothing for this project
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        if state.get("s3_endpoint"):
            env.update(FAKE_AWS, MLFLOW_S3_ENDPOINT_URL=state["s3_endpoint"], AWS_ENDPOINT_URL=state["s3_endpoint"])
        return env

    def write_auth_config(self) -> Path:
        """MLflow's basic-auth settings (no secret in it): users in PostgreSQL, none but the admin."""
        path = self.dir / "basic_auth.ini"
        path.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {self.pg_url('mlflow_auth')}\n"
                        f"admin_username = {ADMIN}\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        return path

    def start_mlflow(self) -> None:
        state = self.state()
        mlflow = Path(sys.executable).parent / "mlflow"
        # basic auth: without it anyone on the host could register models or overwrite their code/ through the
        # artifact proxy, and that code runs wherever @champion is loaded
        command = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--app-name", "basic-auth",
                   "--backend-store-uri", self.pg_url("mlflow"),
                   "--artifacts-destination", state["artifacts_destination"],
                   "--host", "127.0.0.1", "--port", str(state["mlflow_port"]), "--workers", str(state["workers"])]
        self.spawn("mlflow", command, self.mlflow_env())
        # the first start creates the schema (alembic migrations): tens of seconds on a small machine
        wait_http(self.tracking_uri() + "/health", 300, "mlflow", self)

    def stop_mlflow(self) -> bool:
        pid = self.pid("mlflow")
        if pid is None:
            return False
        stop_pid(pid, group=True)  # the server's workers are in its process group
        return True

    def restart_mlflow(self) -> None:
        self.stop_mlflow()
        self.start_mlflow()

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> int:
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=self.dir, start_new_session=True)  # its own group: stopped as one, and
        log.close()                                                      # a Ctrl-C in the caller's shell spares it
        self.record_pid(name, process.pid)
        return process.pid

    # ---- the commands ------------------------------------------------------------------------------------

    def kept_destination(self) -> str | None:
        """The real S3 destination whose database this folder keeps, or None (none, or one of moto's: those
        artifacts lived in memory, so its database is not worth keeping)."""
        state = self.state()
        if not (self.pg_data / "PG_VERSION").exists() or state.get("s3_endpoint"):
            return None
        return state.get("artifacts_destination")

    def fresh_database_needed(self, artifacts_destination: str | None, fresh: bool) -> bool:
        """Whether this start initialises the database; refuses to discard one kept with real S3 unless `fresh`."""
        kept = self.kept_destination()
        if kept is None or fresh:
            return True
        if artifacts_destination != kept:
            raise BinCounterError(
                f"{self.dir} keeps the database of artifacts in {kept} (its runs, registry and aliases): start it "
                f"with --artifacts-destination {kept}, or pass --fresh to discard it")
        return False

    @contextlib.contextmanager
    def start_lock(self):
        """One `start` at a time per folder: two would initialise and start the same cluster at once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "start.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BinCounterError(f"another `start` of {self.dir} is running; wait for it") from None
            yield

    def start(self, artifacts_destination: str | None = None, workers: int = 2, fresh: bool = False) -> str:
        with self.start_lock():
            return self._start(artifacts_destination, workers, fresh)

    def _start(self, artifacts_destination: str | None, workers: int, fresh: bool) -> str:
        running = self.running()
        if all(running.values()):
            return self.tracking_uri()
        # moto keeps S3 in memory: a database that outlived its artifacts would list runs whose files are gone,
        # so with moto every start is a fresh database; with real S3 the database is kept, and only --fresh
        # discards it (a plain start after one with real S3 is refused, not a wipe of the team's runs).
        initialise = self.fresh_database_needed(artifacts_destination, fresh)
        if any(running.values()):
            self.stop()  # a half-started set from an earlier failure: start clean
        bindir = ensure_postgres()
        for folder in (self.dir, self.pids, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        if initialise:
            self.init_postgres(bindir)
        state = self.state() if not initialise and self.state().get("pg_port") else {}
        pg_port = state.get("pg_port") or free_port()
        state = {"pg_port": pg_port, "workers": workers, "mlflow_port": state.get("mlflow_port") or free_port()}
        try:
            self.start_postgres(bindir, pg_port)
            self.create_databases(pg_port)
            if artifacts_destination:
                state.update(artifacts_destination=artifacts_destination, s3_endpoint=None)
            else:
                state.update(artifacts_destination=f"s3://{BUCKET}/artifacts", bucket=BUCKET,
                             s3_endpoint=self.start_moto(free_port()))
            self.save_state(state)
            self.start_mlflow()
        except BaseException:
            self.stop()
            raise
        write_env(self.dir / "env", self.client_env())  # holds the admin password: 0600
        return self.tracking_uri()

    def stop(self) -> list[str]:
        """Stop what `start` recorded, newest first; a recorded pid that is now another program is left alone."""
        stopped = []
        if self.stop_mlflow():
            stopped.append("mlflow")
        if (pid := self.pid("moto")) is not None:
            stop_pid(pid, group=True)
            stopped.append("moto")
        if self.pid("postgres") is not None:
            try:
                bindir = postgres_bindir()
            except BinCounterError:
                bindir = None
            self.stop_postgres(bindir)
            stopped.append("postgres")
        for name in MARKERS:
            (self.pids / f"{name}.pid").unlink(missing_ok=True)
        return stopped


# ---- helpers ---------------------------------------------------------------------------------------------


def start_time(pid: int) -> str:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): a reused pid has another."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def write_private(path: Path, text: str) -> None:
    """`text` in a file only its owner can read from the first byte on (write-then-chmod leaves a window)."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(text)


def write_env(path: Path, values: dict[str, str]) -> None:
    """A file to `source`, only its owner can read (it holds credentials): values quoted for the shell, so a folder
    named with a space or a `$` stays itself."""
    write_private(path, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()))


def run(command: list[str], what: str, **kwargs) -> None:
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise BinCounterError(f"{what} failed (exit {result.returncode}): {lines[-1]}")


def check_traversable(path: Path) -> None:
    """The postgres user must reach its data folder: every folder above it needs o+x."""
    for parent in path.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise BinCounterError(f"the postgres user cannot enter {parent} (no o+x); choose a --dir it can reach")


def postgres_bindir() -> Path:
    """The newest PostgreSQL server installation: Debian's /usr/lib/postgresql/N/bin, else initdb on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    for folder in map(Path, candidates):
        if all((folder / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise BinCounterError("PostgreSQL server not found (no initdb/pg_ctl/postgres)")


def ensure_postgres() -> Path:
    """PostgreSQL's server binaries, installed with apt when missing; one clear error when that is impossible."""
    try:
        return postgres_bindir()
    except BinCounterError:
        pass
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BinCounterError("PostgreSQL is not installed and cannot be installed here (needs root and apt-get): "
                              "install Debian's `postgresql` package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    print("installing PostgreSQL with apt-get ...", file=sys.stderr)
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)  # a stale package index
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise BinCounterError(f"PostgreSQL is not installed and `apt-get install postgresql` failed: {reason}")
    return postgres_bindir()


def wait_http(url: str, seconds: float, name: str, server: TeamServer) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        pid = int((server.pids / f"{name}.pid").read_text().split()[0])
        if not alive(pid):  # not `server.pid`: a process just started may not show its command line yet
            raise BinCounterError(f"{name} exited while starting: {log_tail(server.logs / f'{name}.log')}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise BinCounterError(f"{name} did not answer {url} within {seconds:.0f} s (see {server.logs / f'{name}.log'})")


def log_tail(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "rror" in line]
    return (errors or lines or ["no log"])[-1].strip()[:300]


def stop_pid(pid: int, group: bool, seconds: float = 30) -> None:
    """SIGTERM (its process group when it leads one), then SIGKILL if it is still there after `seconds`."""
    def send(sig):
        try:
            os.killpg(pid, sig) if group else os.kill(pid, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not alive(pid):
            return
        time.sleep(0.2)
    send(signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reaps it when it is our own child (a test's), else raises
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tools/team_server.py",
                                     description="A local MLflow tracking server on PostgreSQL with S3 artifacts.")
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", default=os.environ.get("TEAM_SERVER_DIR", DEFAULT_DIR),
                        help="folder the server's data, logs and pids live in (default .team-server)")
    parser.add_argument("--artifacts-destination",
                        help="real S3 (s3://bucket/prefix, credentials from the environment) instead of a local moto "
                             "server; the database is then kept between starts")
    parser.add_argument("--workers", type=int, default=2, help="mlflow server worker processes (default 2)")
    parser.add_argument("--fresh", action="store_true",
                        help="start: discard a database kept with real S3 artifacts and initialise a new one")
    args = parser.parse_args(argv)
    server = TeamServer(args.dir)
    try:
        if args.artifacts_destination and not args.artifacts_destination.startswith("s3://"):
            raise BinCounterError("--artifacts-destination must be s3://bucket/prefix, "
                                  f"got {args.artifacts_destination!r}")
        if args.command == "start":
            uri = server.start(args.artifacts_destination, args.workers, args.fresh)
            state = server.state()
            print(f"PostgreSQL  {server.pg_url('mlflow')} (password in {server.pgpass})")
            print(f"Optuna      tune --storage {server.pg_url('optuna')}  (with PGPASSFILE={server.pgpass})")
            print(f"artifacts   {state['artifacts_destination']}"
                  + (f" on moto at {state['s3_endpoint']}" if state.get("s3_endpoint") else ""))
            print(f"logs        {server.logs}   stop: make server-stop   all variables: source {server.dir / 'env'}")
            print(f"export MLFLOW_TRACKING_URI={uri}")
        elif args.command == "stop":
            stopped = server.stop()
            print(f"stopped {', '.join(stopped)}" if stopped else f"nothing running from {server.dir}")
        else:
            running = server.running()
            for name, pid in running.items():
                print(f"{name:9} {'pid ' + str(pid) if pid else 'not running'}")
            if all(running.values()):
                print(f"export MLFLOW_TRACKING_URI={server.tracking_uri()}")
            else:
                sys.exit(1)
    except BinCounterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        server.stop()
        print("interrupted: stopped what was started", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
