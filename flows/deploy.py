"""Run the Prefect side of the deployment as processes: server, work pools, workers, deployments, one cycle.

A Prefect server (its own PREFECT_HOME and sqlite database), one process work pool and one worker per pool, the
deployments of infra/prefect.yaml, and one cycle run by hand; everything stopped by pid.

Python: `PrefectStack.start(...)` (`.create_pools`, `.set_variables`, `.start_worker`, `.deploy`, `.stop`) and
`run_cycle(...)`. Command line: `python -m flows.deploy --help`; infra/prefect/ wraps it, infra/README.md says which
host runs what. Each step does what one documented command does (`prefect server start`, `prefect work-pool create
--type process`, `prefect variable set`, `prefect worker start`, `prefect deploy --all --prefect-file`) against this
stack's server; pools and variables go through the Python client, as each `prefect` command costs ~5 s of start-up
here. Processes start and stop with the helpers of `federated.deploy` and are recorded, with their start times, in
`<run dir>/prefect.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import click
import httpx
import typer
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.variables import Variable
from prefect.workers.process import ProcessWorker

from federated.deploy import FLOWER_ENV, ProcessRecord, free_port, is_running, spawn, stop_process, stop_processes

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO_ROOT / "infra" / "prefect.yaml"
DEFAULT_RUN_DIR = REPO_ROOT / "build" / "prefect"  # git-ignored
SITES = ("aurelia", "northbridge", "lakeside")
FEDERATION_POOL = "federation"  # the coordinator's pool: federation round and federation publish
# Prefect Variables read by infra/prefect.yaml when `prefect deploy` runs (absolute paths on the hosts).
VARIABLES = ("twinfed_data_dir", "twinfed_federation_dir", "twinfed_operator_home")
# Deployment names, unique across flows (prefect.yaml and its triggers use the same).
INGEST = "ingest-{site}"
PUBLISH = "publish-{site}"
ROUND = "federation-round"
FEDERATION_PUBLISH = "federation-publish"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class StackError(RuntimeError):
    """A Prefect process or command failed; the message says which, and where its log is."""


@dataclass
class PrefectStack:
    """A Prefect server (its own PREFECT_HOME, sqlite, port) and the workers polling its pools, as processes here."""

    run_dir: Path
    port: int
    host: str = "127.0.0.1"
    processes: dict[str, ProcessRecord] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """The server's API, as every worker and client is given it (PREFECT_API_URL)."""
        return f"http://{self.host}:{self.port}/api"

    @property
    def home(self) -> Path:
        """PREFECT_HOME of the server, its workers and their flow runs (the server's sqlite database is here)."""
        return self.run_dir / "home"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a Prefect process of this stack: its home and API, no analytics, the venv on PATH."""
        env = dict(os.environ) | FLOWER_ENV | {
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLI_PROMPT": "false",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }  # fmt: skip
        return env | dict(extra or {})

    @classmethod
    def start(
        cls, run_dir: Path, *, port: int | None = None, scheduler: bool = True, timeout: float = 120.0
    ) -> PrefectStack:
        """Start `prefect server start` on localhost and wait until its API answers.

        `scheduler=False` keeps the server from creating the schedules' runs (a rehearsal runs its cycle by hand).
        """
        run_dir.mkdir(parents=True, exist_ok=True)
        stack = cls(run_dir=run_dir.resolve(), port=port or free_port())
        extra = {} if scheduler else {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
        command = ["prefect", "server", "start", "--host", stack.host, "--port", str(stack.port), "--no-ui"]
        stack._spawn("server", command, extra)
        deadline = time.monotonic() + timeout
        while not stack.healthy():
            stack._check_alive("server")
            if time.monotonic() > deadline:
                stack.stop()
                raise StackError(f"the Prefect server did not answer on {stack.api_url} within {timeout:g} s; "
                                 f"see {stack.processes['server'].log}")  # fmt: skip
            time.sleep(0.5)
        return stack

    @classmethod
    def load(cls, run_dir: Path) -> PrefectStack:
        """The stack started with this run folder (from its `prefect.json`)."""
        state_file = run_dir / "prefect.json"
        if not state_file.exists():
            raise StackError(f"no Prefect stack was started with run folder {run_dir} ({state_file} is missing)")
        state = json.loads(state_file.read_text())
        return cls(run_dir=Path(state["run_dir"]), port=int(state["port"]), host=state["host"],
                   processes={name: ProcessRecord(**p) for name, p in state["processes"].items()})  # fmt: skip

    def save(self) -> None:
        """Write `prefect.json`."""
        state = {"run_dir": str(self.run_dir), "host": self.host, "port": self.port,
                 "processes": {name: asdict(p) for name, p in self.processes.items()}}  # fmt: skip
        (self.run_dir / "prefect.json").write_text(json.dumps(state, indent=2))

    def healthy(self) -> bool:
        """Whether the server's API answers its health check."""
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2.0).is_success
        except httpx.HTTPError:
            return False

    def prefect(self, *args: str, timeout: float = 300.0) -> str:
        """Run one `prefect` command against this server from the repository root; its output, or raise with it."""
        done = subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], env=self.env({"COLUMNS": "200"}),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)  # fmt: skip
        if done.returncode != 0:
            raise StackError(f"`prefect {' '.join(args)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done.stdout

    def create_pools(self, pools: Sequence[str]) -> None:
        """One process work pool per name, as `prefect work-pool create NAME --type process --overwrite` makes it."""
        template = ProcessWorker.get_default_base_job_template()
        with self.client() as client:
            for pool in pools:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template),
                                        overwrite=True)  # fmt: skip

    def set_variables(self, values: Mapping[str, str]) -> None:
        """Set Prefect Variables, as `prefect variable set NAME VALUE --overwrite` does."""
        with temporary_settings({PREFECT_API_URL: self.api_url}):
            for name, value in values.items():
                Variable.set(name, value, overwrite=True)

    def start_worker(self, pool: str, *, checkout: Path = REPO_ROOT, query_seconds: float | None = None) -> None:
        """Start `prefect worker start --pool POOL`; its flow runs work in `checkout` (the pull step reads it)."""
        extra = {"TWINFED_CHECKOUT": str(checkout.resolve())}
        if query_seconds is not None:  # how often the worker asks for scheduled runs (default 10 s)
            extra["PREFECT_WORKER_QUERY_SECONDS"] = str(query_seconds)
        command = ["prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", f"{pool}-worker"]
        self._spawn(f"worker-{pool}", command, extra)

    def deploy(self, prefect_file: Path = PREFECT_FILE) -> str:
        """Create or update every deployment of `prefect_file` (`prefect deploy --all --prefect-file FILE`)."""
        missing = [name for name in VARIABLES if not self.variable(name)]
        if missing:
            raise StackError(f"set the Prefect Variables {', '.join(missing)} first (`prefect variable set`): "
                             f"{prefect_file} reads them when it is deployed")  # fmt: skip
        return self.prefect("deploy", "--all", "--prefect-file", str(prefect_file.resolve()))

    def variable(self, name: str) -> Any:
        """A Prefect Variable's value, or None if it is not set."""
        with temporary_settings({PREFECT_API_URL: self.api_url}):
            return Variable.get(name)

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """A synchronous Prefect client talking to this server."""
        with temporary_settings({PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client

    def stop(self) -> None:
        """Stop every process this stack started, by pid: the workers (and their flow runs), then the server."""
        stop_processes([record for name, record in self.processes.items() if name != "server"])
        if "server" in self.processes:
            stop_process(self.processes["server"])
        self.save()

    def _spawn(self, name: str, command: list[str], extra: Mapping[str, str]) -> None:
        command = [str(Path(sys.executable).parent / command[0]), *command[1:]]
        log = self.run_dir / "logs" / f"{name}.log"
        self.processes[name] = spawn(name, command, env=self.env(extra), log=log, cwd=REPO_ROOT)
        self.save()

    def _check_alive(self, name: str) -> None:
        record = self.processes[name]
        if not is_running(record):
            tail = "\n".join(Path(record.log).read_text(errors="replace").splitlines()[-20:])
            raise StackError(f"{name} (pid {record.pid}) exited; {record.log} ends:\n{tail}")


# ------------------------------------------------------------------------------------------------ one cycle


@dataclass(frozen=True)
class CycleRun:
    """One flow run of the cycle: which deployment, how it was started, how it ended."""

    deployment: str
    flow_run_id: str
    started_by: str  # "manual" (this cycle created it), "trigger" (an automation did, per its created_by) or "other"
    state: str
    seconds: float


def run_cycle(
    stack: PrefectStack,
    sites: Sequence[str] = SITES,
    *,
    ingest_parameters: Mapping[str, Any] | None = None,
    round_parameters: Mapping[str, Any] | None = None,
    timeout: float = 1800.0,
) -> list[CycleRun]:
    """Run one scheduled cycle now: the sites' ingestion, the round, and what the round's triggers start.

    The ingestion and the federation round are started by hand, as their schedules would start them; then it waits
    for the runs the deployment triggers create: each site's publish, then the federation's.

    Returns every run of the cycle; raises StackError naming the first that did not complete.
    """
    with stack.client() as client:
        ids = {deployment.name: deployment.id for deployment in client.read_deployments()}
        started = datetime.now(UTC)
        ingests = [_run(client, ids, INGEST.format(site=site), ingest_parameters) for site in sites]
        runs = [_finish(client, run, "manual", timeout) for run in ingests]
        _check(runs)
        runs.append(_finish(client, _run(client, ids, ROUND, round_parameters), "manual", timeout))
        _check(runs)
        for name in [PUBLISH.format(site=site) for site in sites] + [FEDERATION_PUBLISH]:
            triggered = _wait_for_run(client, ids[name], after=started, timeout=timeout)
            # The server stamps a run an automation's action created with created_by.type "AUTOMATION".
            by = triggered.created_by
            runs.append(_finish(client, triggered, "trigger" if by and by.type == "AUTOMATION" else "other", timeout))
        _check(runs)
    return runs


def _run(
    client: SyncPrefectClient, ids: Mapping[str, UUID], name: str, parameters: Mapping[str, Any] | None
) -> FlowRun:
    """Create a run of the named deployment now (what `prefect deployment run` does)."""
    if name not in ids:
        raise StackError(f"no deployment named {name!r} on the server: deploy infra/prefect.yaml first")
    return client.create_flow_run_from_deployment(ids[name], parameters=dict(parameters or {}))


def _wait_for_run(client: SyncPrefectClient, deployment_id: UUID, *, after: datetime, timeout: float) -> FlowRun:
    """The first run of the deployment created after `after` (a trigger's), once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        )
        found = [run for run in found if run.created is not None and run.created >= after]
        if found:
            return found[0]
        time.sleep(2.0)
    raise StackError(f"no run of deployment {deployment_id} was triggered within {timeout:g} s")


def _finish(client: SyncPrefectClient, run: FlowRun, started_by: str, timeout: float) -> CycleRun:
    """Wait until the run reaches a final state."""
    deadline = time.monotonic() + timeout
    while (state := client.read_flow_run(run.id)).state_type is None or state.state_type.value not in FINAL:
        if time.monotonic() > deadline:
            raise StackError(f"flow run {run.name} ({run.id}) still {state.state_name} after {timeout:g} s")
        time.sleep(2.0)
    name = client.read_deployment(run.deployment_id).name if run.deployment_id else "?"
    return CycleRun(name, str(run.id), started_by, str(state.state_type.value), state.total_run_time.total_seconds())


def _check(runs: Sequence[CycleRun]) -> None:
    failed = [run for run in runs if run.state != "COMPLETED"]
    if failed:
        names = ", ".join(f"{run.deployment} ({run.state}, flow run {run.flow_run_id})" for run in failed)
        raise StackError(
            f"the cycle stopped: {names} did not complete; see the workers' logs and `prefect flow-run logs`"
        )


# -------------------------------------------------------------------------------------------------- command line

cli = typer.Typer(name="flows.deploy", help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=False)
RunDir = Annotated[Path, typer.Option(help="Run folder: state, logs, PREFECT_HOME.")]


@cli.command()
def server(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    port: Annotated[int, typer.Option(help="API port (0: any free port).")] = 0,
) -> None:
    """Start a Prefect server in the background (its own PREFECT_HOME and sqlite database under the run folder)."""
    if (run_dir / "prefect.json").exists() and any(map(is_running, PrefectStack.load(run_dir).processes.values())):
        raise typer.BadParameter(f"a Prefect stack from {run_dir} still runs: stop it first", param_hint="--run-dir")
    stack = PrefectStack.start(run_dir, port=port or None)
    typer.echo(f"Prefect server on {stack.api_url}; log in {stack.processes['server'].log}")
    typer.echo(f"export PREFECT_API_URL={stack.api_url}")


@cli.command()
def pools(run_dir: RunDir = DEFAULT_RUN_DIR, pool: Annotated[list[str] | None, typer.Option()] = None) -> None:
    """Create the process work pools (default: one per site, and `federation`)."""
    PrefectStack.load(run_dir).create_pools(pool or [*SITES, FEDERATION_POOL])


@cli.command()
def variables(
    data_dir: Annotated[Path, typer.Option(help="The data folder (holds drops/ and sites/).")],
    operator_home: Annotated[Path, typer.Option(help="FLWR_HOME of the operator connected to the SuperLink.")],
    federation_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints and registry (default DATA/federation).")
    ] = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
) -> None:
    """Set the Prefect Variables infra/prefect.yaml reads (absolute paths)."""
    values = {"twinfed_data_dir": data_dir, "twinfed_federation_dir": federation_dir or data_dir / "federation",
              "twinfed_operator_home": operator_home}  # fmt: skip
    PrefectStack.load(run_dir).set_variables({name: str(path.resolve()) for name, path in values.items()})


@cli.command()
def worker(
    pool: Annotated[list[str], typer.Option(help="A work pool to start a worker for.")],
    run_dir: RunDir = DEFAULT_RUN_DIR,
    checkout: Annotated[Path, typer.Option(help="This host's repository checkout.")] = REPO_ROOT,
) -> None:
    """Start one worker per pool in the background."""
    stack = PrefectStack.load(run_dir)
    for name in pool:
        stack.start_worker(name, checkout=checkout)
    typer.echo(f"workers for {', '.join(pool)}; logs in {run_dir / 'logs'}")


@cli.command()
def deploy(run_dir: RunDir = DEFAULT_RUN_DIR, prefect_file: Path = PREFECT_FILE) -> None:
    """Create or update the deployments of infra/prefect.yaml."""
    typer.echo(PrefectStack.load(run_dir).deploy(prefect_file))


@cli.command()
def cycle(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    run_config: Annotated[str, typer.Option(help="Run config overrides of the round, as JSON.")] = "{}",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each run.")] = 1800.0,
) -> None:
    """Run one cycle now: the sites' ingestion, the federation round, and wait for the triggered publishes."""
    overrides = json.loads(run_config)
    runs = run_cycle(PrefectStack.load(run_dir), round_parameters={"run_config": overrides} if overrides else None,
                     timeout=timeout)  # fmt: skip
    for run in runs:
        typer.echo(f"{run.deployment:<22} {run.started_by:<8} {run.state:<10} {run.seconds or 0:6.0f} s")


@cli.command()
def stop(run_dir: RunDir = DEFAULT_RUN_DIR) -> None:
    """Stop every process the stack in this run folder started."""
    PrefectStack.load(run_dir).stop()
    typer.echo("stopped")


def main() -> None:
    """The command line, with a failed step reported as one message (what failed, which log) and exit code 1."""
    try:
        cli(standalone_mode=False)
    except click.ClickException as error:
        error.show()
        raise SystemExit(error.exit_code) from None
    except StackError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
