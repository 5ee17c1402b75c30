"""Run the twin federation as processes: deployed (TLS, SuperNode authentication) or simulated; submit, wait, stop.

Deployed means a SuperLink with TLS and SuperNode authentication and one SuperNode per hospital (on one machine: the
rehearsal of the multi-host deployment); simulated means Flower's simulation runtime behind a managed local SuperLink.

Python: `start_federation(...)` -> `Federation` (`.submit`, `.wait`, `.stop`), `simulate(...)`. Command line:
`python -m federated.deploy --help` (credentials, node-key, start, submit, stop, simulate); infra/flower/ wraps it and
docs/federation.md explains both modes.

Every process gets FLWR_TELEMETRY_ENABLED=0, FLWR_DISABLE_UPDATE_CHECK=1, its own FLWR_HOME, and
FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: left on, the SuperLink runs `uv sync` on the app's pyproject for
every run, i.e. resolves torch, ray, prefect... into a fresh environment from the network. Processes start in their
own session (process group); stopping one stops the whole tree under it, found by parent pid, because the SuperLink
starts its SuperExec (which starts the ServerApp) in a session of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import click
import httpx
import pathspec
import tomli_w
import typer
from flwr.common.config import parse_config_args

from federated.credentials import (
    DEFAULT_CREDENTIALS_DIR,
    Credentials,
    CredentialsError,
    make_credentials,
    make_node_key,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SITES = ("aurelia", "northbridge", "lakeside")  # twin_app's too; importing it (torch) would slow every command
DEFAULT_RUN_DIR = REPO_ROOT / "build" / "federation"  # git-ignored, and never packaged into a FAB
DEFAULT_SECRETS_DIR = REPO_ROOT / DEFAULT_CREDENTIALS_DIR
CONNECTION = "twinfed"  # the name of the SuperLink connection in the operator's Flower configuration
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
FINISHED = "finished"


class DeploymentError(RuntimeError):
    """A Flower process or command failed; the message says which, and where its log is."""


# ------------------------------------------------------------------------------------------------ environment


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: ours, no phoning home, no `uv sync`, its own FLWR_HOME, venv on PATH."""
    env = dict(os.environ) | FLOWER_ENV | {"FLWR_HOME": str(flwr_home.resolve())}
    # Flower starts `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` by name: they must resolve to this venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env | dict(extra or {})


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# -------------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessRecord:
    """A process we started: enough to find it again from another command, and to tell it from a reused pid."""

    name: str
    pid: int
    started: int  # start time in clock ticks since boot (/proc/<pid>/stat field 22)
    log: str


def spawn(name: str, command: Sequence[str], *, env: Mapping[str, str], log: Path, cwd: Path) -> ProcessRecord:
    """Start `command` in a new session with stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(env), cwd=cwd, start_new_session=True)  # fmt: skip
    _CHILDREN[process.pid] = process
    return ProcessRecord(name, process.pid, _start_time(process.pid) or 0, str(log))


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # ours to reap, so a dead child does not linger as a zombie


def is_running(record: ProcessRecord) -> bool:
    """Whether the process is still the one we started, and not dead."""
    child = _CHILDREN.get(record.pid)
    if child is not None and child.poll() is not None:
        return False
    return _start_time(record.pid) == record.started and _state(record.pid) not in ("Z", "X", None)


def exit_code(record: ProcessRecord) -> int | None:
    """The exit code of a process this interpreter started, once it ended (None while it runs or if not ours)."""
    child = _CHILDREN.get(record.pid)
    return child.poll() if child is not None else None


def stop_process(record: ProcessRecord, *, grace: float = 10.0) -> None:
    """Stop the process and everything under it: SIGTERM, then SIGKILL whatever still runs after `grace` seconds."""
    stop_processes([record], grace=grace)


def stop_processes(records: Sequence[ProcessRecord], *, grace: float = 10.0) -> None:
    """Stop several processes and their trees together (each takes a second or two to shut down cleanly)."""
    members = [pid for record in records for pid in _members(record)]
    if _alive(members):
        _signal(members, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive([pid for record in records for pid in _members(record)]):
            for record in records:
                _reap(record.pid)
            time.sleep(0.1)
        _signal([pid for record in records for pid in _members(record)], signal.SIGKILL)
    for record in records:
        _reap(record.pid)


def kill_process(record: ProcessRecord) -> None:
    """Kill the process and its tree at once (SIGKILL), as a crash or a pulled plug would."""
    _signal(_members(record), signal.SIGKILL)
    _reap(record.pid)


def _members(record: ProcessRecord) -> list[int]:
    """The process (while it is still ours), its descendants, and what remains of its session after it died.

    A session outlives its leader: a dead SuperNode's SuperExec, reparented to init, is found by its session id
    (the pid we started, since each process starts a session), not by its parent.
    """
    table: dict[int, tuple[int, int, int]] = {}  # pid -> (parent pid, session id, start time)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    roots = [pid for pid, (_, session, started) in table.items()
             if (pid == record.pid and started == record.started)
             or (session == record.pid and pid != record.pid and started >= record.started)]  # fmt: skip
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, frontier = set(roots), list(roots)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return sorted(found)


def _signal(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if _state(pid) not in ("Z", "X", None)]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        child.poll()  # collects the exit status of a child that ended (it stays in _CHILDREN for exit_code)


# ---------------------------------------------------------------------------------------------------- the app


def stage_app(repo: Path, dest: Path) -> Path:
    """Copy the files of `repo` that its .gitignore keeps into `dest` (emptied first); return `dest`.

    `flwr run <dir>` walks the whole directory (here 64k files in .venv and data/: ~10 s) before dropping what the
    root .gitignore excludes; the FAB built from the staged copy is byte-for-byte the same, in about a second.
    """
    gitignore = repo / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    spec = pathspec.GitIgnoreSpec.from_lines([*lines, ".git/"])
    if dest.exists():
        shutil.rmtree(dest)
    for folder, subfolders, files in os.walk(repo):
        here = Path(folder).relative_to(repo)
        subfolders[:] = [d for d in subfolders if not spec.match_file(f"{(here / d).as_posix()}/")]
        for name in files:
            source = Path(folder) / name
            relative = (here / name).as_posix()
            if source.is_symlink() or spec.match_file(relative):
                continue
            (dest / here).mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / relative)
    return dest


def write_run_config(path: Path, run_config: Mapping[str, Any]) -> Path:
    """The run config overrides as a TOML file (`flwr run --run-config <file>.toml`): any value, no shell quoting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(run_config)))
    return path


def node_config(site: str, data_dir: Path) -> str:
    """A SuperNode's `--node-config`: its site name and (absolute) data folder."""
    values = {"site": site, "data-dir": str(data_dir.resolve())}
    if any('"' in v or "\\" in v for v in values.values()):
        raise ValueError(f"site names and data folders cannot contain quotes or backslashes: {values}")
    return " ".join(f'{key}="{value}"' for key, value in values.items())


# --------------------------------------------------------------------------------------------- the flwr CLI


@dataclass(frozen=True)
class RunResult:
    """How a run ended, with its logs (the ServerApp's and ClientApps', as `flwr log` gives them)."""

    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed", "finished:stopped"
    details: str
    elapsed: float
    logs: str

    @property
    def succeeded(self) -> bool:
        """Whether the run finished and completed."""
        return self.status == f"{FINISHED}:completed"

    def check(self) -> RunResult:
        """Self, if the run completed; else raise with its status and the tail of its logs."""
        if not self.succeeded:
            tail = "\n".join(self.logs.splitlines()[-60:])
            raise DeploymentError(f"run {self.run_id} ended {self.status} ({self.details}); its log ends:\n{tail}")
        return self


@dataclass(frozen=True)
class Operator:
    """The `flwr` command line of whoever submits runs, with its own FLWR_HOME holding one SuperLink connection."""

    home: Path
    connection: str = CONNECTION
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def connect(self, address: str | None, root_certificates: Path | None = None) -> Operator:
        """Write the Flower configuration: a TLS connection to `address`, or (None) a managed local SuperLink."""
        entry: dict[str, Any] = {"address": address or ":local:"}
        if root_certificates is not None:
            entry["root-certificates"] = str(root_certificates.resolve())
        self.home.mkdir(parents=True, exist_ok=True)
        toml = {"superlink": {"default": self.connection, self.connection: entry}}
        (self.home / "config.toml").write_text(tomli_w.dumps(toml))
        return self

    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run `flwr <args> --format json`; return its JSON, or raise with what it said."""
        completed = self._run([*args, "--format", "json"], timeout)
        try:
            answer: dict[str, Any] = json.loads(completed.stdout[completed.stdout.index("{") :])
        except ValueError:
            answer = {"success": False, "error-message": completed.stdout + completed.stderr}
        if completed.returncode != 0 or not answer.get("success"):
            message = str(answer.get("error-message", completed.stderr)).strip()
            raise DeploymentError(f"`flwr {' '.join(args)}` failed: {message}")
        return answer

    def register(self, public_key: Path, name: str) -> int | None:
        """Register a SuperNode's public key; its node id, or None if this key was registered before."""
        try:
            answer = self.flwr("supernode", "register", str(public_key), self.connection, "--name", name)
        except DeploymentError as error:
            if "already in use" in str(error):
                return None
            raise
        return int(answer["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """The registered SuperNodes and their status (`registered`, `online`, `offline`)."""
        return list(self.flwr("supernode", "list", self.connection)["nodes"])

    def submit(self, app: Path, run_config: Path, federation_config: str | None = None) -> int:
        """Submit a run of the app in folder `app` with the run config overrides in a TOML file; its run id."""
        args = ["run", str(app.resolve()), self.connection, "--run-config", str(run_config.resolve())]
        if federation_config:
            args += ["--federation-config", federation_config]
        return int(self.flwr(*args, timeout=300.0)["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        """One run's row of `flwr list` (status, status-details, elapsed, ...)."""
        return dict(self.flwr("list", self.connection, "--run-id", str(run_id))["runs"][0])

    def logs(self, run_id: int) -> str:
        """The run's logs so far (ServerApp and ClientApps, as the SuperLink keeps them)."""
        return self._run(["log", str(run_id), self.connection, "--show"], 120.0).stdout

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run."""
        self.flwr("stop", str(run_id), self.connection)

    def wait(self, run_id: int, *, log: Path, timeout: float, poll: float = 5.0) -> RunResult:
        """Follow the run's logs into `log` until it finishes; its result. Stop it and raise after `timeout` s.

        One `flwr log --stream` (the SuperLink ends the stream when the run finishes) instead of polling
        `flwr list`, whose every call costs a Python start-up on the cores the training needs.
        """
        deadline = time.monotonic() + timeout
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            stream = subprocess.Popen(self._command(["log", str(run_id), self.connection, "--stream"]), stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._env(),
                                      cwd=self.home)  # fmt: skip
            try:
                stream.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stream.kill()
                stream.wait()
        while (row := self.run_status(run_id))["status"].split(":")[0] != FINISHED:  # the stream broke off early
            if time.monotonic() > deadline:
                self.stop_run(run_id)
                tail = "\n".join(self.logs(run_id).splitlines()[-60:])
                raise DeploymentError(f"run {run_id} still {row['status']} after {timeout:g} s (stopped). Log:\n{tail}")
            time.sleep(poll)
        logs = log.read_text(errors="replace")
        if stream.returncode != 0:
            logs = self.logs(run_id)
            log.write_text(logs)
        return RunResult(run_id, row["status"], str(row["status-details"]), float(row["elapsed"]), logs)

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._command(args), env=self._env(), capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=self.home, stdin=subprocess.DEVNULL)  # fmt: skip

    def _command(self, args: list[str]) -> list[str]:
        return [str(Path(sys.executable).parent / "flwr"), *args]

    def _env(self) -> dict[str, str]:
        return flower_env(self.home, self.extra_env) | {"COLUMNS": "200", "NO_COLOR": "1"}


# ------------------------------------------------------------------------------------- the rehearsal federation


@dataclass
class Federation:
    """A TLS SuperLink with SuperNode authentication and one SuperNode per hospital, as processes on this machine.

    Its run folder holds `federation.json` (what `Federation.load` reads back), one log per process under `logs/`,
    each process's FLWR_HOME under `homes/`, the SuperLink's state database, staged apps and run logs.
    """

    run_dir: Path
    credentials: Credentials
    host: str
    port: int
    sites: dict[str, str]  # site -> data folder given to its SuperNode
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs share it since Flower 1.40)."""
        return f"{self.host}:{self.port}"

    @property
    def operator(self) -> Operator:
        """The `flwr` CLI connected to this SuperLink over TLS."""
        return Operator(self.run_dir / "homes" / "operator")

    @property
    def federation_dir(self) -> Path:
        """Where the ServerApp keeps checkpoints and the registry, unless a run says otherwise."""
        return self.run_dir / "federation"

    @classmethod
    def load(cls, run_dir: Path) -> Federation:
        """The federation started with this run folder (from its `federation.json`)."""
        state_file = run_dir / "federation.json"
        if not state_file.exists():
            raise DeploymentError(f"no federation was started with run folder {run_dir} ({state_file} is missing)")
        state = json.loads(state_file.read_text())
        return cls(run_dir=Path(state["run_dir"]), credentials=Credentials(Path(state["credentials"])),
                   host=state["host"], port=int(state["port"]), sites=dict(state["sites"]),
                   processes={name: ProcessRecord(**p) for name, p in state["processes"].items()},
                   node_ids={k: int(v) for k, v in state["node_ids"].items()})  # fmt: skip

    def save(self) -> None:
        """Write `federation.json`."""
        state = {"run_dir": str(self.run_dir), "credentials": str(self.credentials.folder), "host": self.host,
                 "port": self.port, "sites": self.sites, "node_ids": self.node_ids,
                 "processes": {name: asdict(p) for name, p in self.processes.items()}}  # fmt: skip
        (self.run_dir / "federation.json").write_text(json.dumps(state, indent=2))

    def start_superlink(self, *, timeout: float = 60.0) -> None:
        """Start the SuperLink (TLS, SuperNode authentication, state in a database file) and wait until it answers."""
        command = ["flower-superlink", "--ssl-ca-certfile", str(self.credentials.ca_cert.resolve()),
                   "--ssl-certfile", str(self.credentials.superlink_cert.resolve()),
                   "--ssl-keyfile", str(self.credentials.superlink_key.resolve()), "--enable-supernode-auth",
                   "--database", str((self.run_dir / "superlink-state.db").resolve()),
                   "--host", self.host, "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]  # fmt: skip
        home = self.run_dir / "homes" / "superlink"
        self._start("superlink", command, home)
        deadline = time.monotonic() + timeout
        context = ssl.create_default_context(cafile=str(self.credentials.ca_cert))
        while not self._healthy(context):
            self._check_alive("superlink")
            if time.monotonic() > deadline:
                raise DeploymentError(f"the SuperLink did not answer on {self.address} within {timeout:g} s; "
                                      f"see {self.processes['superlink'].log}")  # fmt: skip
            time.sleep(0.5)
        self.operator.connect(self.address, self.credentials.ca_cert)

    def register(self, site: str) -> None:
        """Register the site's SuperNode public key with the SuperLink (the documented `flwr supernode register`)."""
        node_id = self.operator.register(self.credentials.node_public_key(site), name=site)
        if node_id is not None:
            self.node_ids[site] = node_id
        self.save()

    def start_supernode(self, site: str, *, private_key: Path | None = None, name: str | None = None) -> ProcessRecord:
        """Start the site's SuperNode: TLS to the SuperLink, authenticated by its key, reading only its own site.

        `private_key` (default: the site's) and `name` (default: the site) let a test start an impostor.
        """
        key = private_key or self.credentials.node_private_key(site)
        command = ["flower-supernode", "--superlink", self.address,
                   "--root-certificates", str(self.credentials.ca_cert.resolve()),
                   "--auth-supernode-private-key", str(key.resolve()),
                   "--node-config", node_config(site, Path(self.sites[site])),
                   # Each SuperNode serves its ClientApps a Runtime API; the default port (9094) would collide.
                   "--host", "127.0.0.1", "--port", str(free_port())]  # fmt: skip
        name = name or site
        return self._start(f"supernode-{name}", command, self.run_dir / "homes" / f"supernode-{name}")

    def wait_online(self, count: int, *, timeout: float = 90.0) -> None:
        """Wait until `count` SuperNodes are online at the SuperLink."""
        deadline = time.monotonic() + timeout
        while sum(node["status"] == "online" for node in self.operator.nodes()) < count:
            for name in self.processes:
                self._check_alive(name)
            if time.monotonic() > deadline:
                raise DeploymentError(f"fewer than {count} SuperNodes came online within {timeout:g} s; "
                                      f"see the logs in {self.run_dir / 'logs'}")  # fmt: skip
            time.sleep(1.0)

    def submit(self, run_config: Mapping[str, Any], *, app: Path = REPO_ROOT) -> int:
        """Stage the app, submit a run with these run config overrides (federation-dir defaults to ours); run id."""
        overrides = {"federation-dir": str(self.federation_dir.resolve())} | dict(run_config)
        runs = self.run_dir / "runs"
        staged = stage_app(app, runs / "app")
        config_file = write_run_config(runs / f"run-config-{time.strftime('%Y%m%dT%H%M%S')}.toml", overrides)
        return self.operator.submit(staged, config_file)

    def wait(self, run_id: int, *, timeout: float = 1800.0) -> RunResult:
        """Wait for the run to finish; its result, with the logs also written to `runs/<run id>.log`."""
        return self.operator.wait(run_id, log=self.run_dir / "runs" / f"{run_id}.log", timeout=timeout)

    def stop(self) -> None:
        """Stop every process this federation started, by pid: the SuperNodes together, then the SuperLink."""
        stop_processes([record for name, record in self.processes.items() if name != "superlink"])
        if "superlink" in self.processes:
            stop_process(self.processes["superlink"])
        self.save()

    def _start(self, name: str, command: list[str], home: Path) -> ProcessRecord:
        record = spawn(name, command, env=flower_env(home), log=self.run_dir / "logs" / f"{name}.log", cwd=home)
        self.processes[name] = record
        self.save()
        return record

    def _healthy(self, context: ssl.SSLContext) -> bool:
        try:
            return httpx.get(f"https://{self.address}/health", verify=context, timeout=2.0).is_success
        except httpx.HTTPError:
            return False

    def _check_alive(self, name: str) -> None:
        record = self.processes[name]
        if not is_running(record):
            tail = "\n".join(Path(record.log).read_text(errors="replace").splitlines()[-20:])
            raise DeploymentError(f"{name} (pid {record.pid}) exited; {record.log} ends:\n{tail}")


def start_federation(
    run_dir: Path,
    credentials: Credentials,
    sites: Mapping[str, Path],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 120.0,
) -> Federation:
    """Start a SuperLink, register each site's key, start each site's SuperNode, and wait until all are online.

    `sites` maps each hospital to the data folder its SuperNode reads (`<data folder>/sites/<site>/features`).
    On any failure, whatever was started is stopped before the error is raised.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    federation = Federation(run_dir=run_dir.resolve(), credentials=credentials, host=host, port=port or free_port(),
                            sites={site: str(Path(d).resolve()) for site, d in sites.items()})  # fmt: skip
    try:
        federation.start_superlink(timeout=timeout)
        for site in sites:
            federation.register(site)
        for site in sites:
            federation.start_supernode(site)
        federation.wait_online(len(sites), timeout=timeout)
    except BaseException:
        federation.stop()
        raise
    return federation


# ---------------------------------------------------------------------------------------------------- simulation


def simulate(
    run_config: Mapping[str, Any],
    *,
    flwr_home: Path,
    app: Path = REPO_ROOT,
    num_supernodes: int = 3,
    cpus_per_node: int = 1,
    timeout: float = 1800.0,
) -> RunResult:
    """Run the app on Flower's simulation runtime (`flwr run` against a managed local SuperLink); its result.

    The managed SuperLink that `flwr run` leaves running is stopped afterwards, by its pid. `flwr_home` isolates
    it: its state, its log (`local-superlink/superlink.log`), and a port of its own.
    """
    # The managed SuperLink listens on 39091 unless told otherwise: another user's would answer in its place.
    ports = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    operator = Operator(flwr_home, "local", ports).connect(None)
    staged = stage_app(app, flwr_home / "app")
    config_file = write_run_config(flwr_home / "run-config.toml", run_config)
    # Flower 1.42 wants these here: `options.*` in the connection still works but is deprecated.
    federation_config = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_node}"
    try:
        try:
            run_id = operator.submit(staged, config_file, federation_config)
        except DeploymentError as error:
            # flwr 1.42 gives the managed SuperLink a fixed 15 s to come up (cli/constant.py); on a busy machine it
            # takes longer but keeps starting: submit once more once it listens.
            if "Failed to start local SuperLink within" not in str(error):
                raise
            _wait_for_port(int(ports["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]), timeout=120.0)
            run_id = operator.submit(staged, config_file, federation_config)
        return operator.wait(run_id, log=flwr_home / f"run-{run_id}.log", timeout=timeout)
    finally:
        stop_processes(local_superlinks(flwr_home))


def _wait_for_port(port: int, *, timeout: float, host: str = "127.0.0.1") -> None:
    """Return once something accepts connections on host:port; DeploymentError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise DeploymentError(f"nothing listens on {host}:{port} after {timeout:g} s")


def local_superlinks(flwr_home: Path) -> list[ProcessRecord]:
    """The managed local SuperLink(s) that `flwr run` started for this FLWR_HOME (found by their log file's path)."""
    log = str((flwr_home / "local-superlink" / "superlink.log").resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if any(a.endswith("flower-superlink") for a in args[:2]) and log in args:
            pid = int(entry.name)
            found.append(ProcessRecord("local-superlink", pid, _start_time(pid) or 0, log))
    return found


# -------------------------------------------------------------------------------------------------- command line

cli = typer.Typer(name="federated.deploy", help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=False)

RunDir = Annotated[Path, typer.Option(help="Run folder: state, logs, FLWR_HOMEs, registry.")]
SecretsDir = Annotated[Path, typer.Option("--credentials", help="Credentials folder (see `credentials`).")]


@cli.command()
def credentials(
    folder: SecretsDir = DEFAULT_SECRETS_DIR,
    site: Annotated[list[str] | None, typer.Option(help="A hospital to make a SuperNode key pair for.")] = None,
    hostname: Annotated[list[str] | None, typer.Option(help="A DNS name of the SuperLink.")] = None,
    address: Annotated[list[str] | None, typer.Option(help="An IP address of the SuperLink.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing credentials (re-register the keys).")] = False,
) -> None:
    """Make whatever is missing of the CA, the SuperLink's TLS certificate and the hospitals' SuperNode keys."""
    made = make_credentials(folder, site or list(DEFAULT_SITES), hostnames=hostname or ["localhost"],
                            addresses=address or ["127.0.0.1", "::1"], overwrite=overwrite)  # fmt: skip
    typer.echo(f"credentials in {made.folder}")


@cli.command("node-key")
def node_key(
    site: Annotated[str, typer.Option(help="The hospital this SuperNode key pair is for.")],
    folder: SecretsDir = DEFAULT_SECRETS_DIR,
) -> None:
    """Make one hospital's SuperNode key pair only (run it on the hospital's host; send the operator the .pub)."""
    credentials = Credentials(folder)
    make_node_key(credentials, site)
    typer.echo(f"private key {credentials.node_private_key(site)} (stays here); public key to register: "
               f"{credentials.node_public_key(site)}")  # fmt: skip


@cli.command()
def start(
    data_dir: Annotated[Path, typer.Option(help="Data folder of sites without their own (holds sites/<site>/).")],
    run_dir: RunDir = DEFAULT_RUN_DIR,
    folder: SecretsDir = DEFAULT_SECRETS_DIR,
    site: Annotated[list[str] | None, typer.Option(help="A hospital, as NAME or NAME=DATA_DIR.")] = None,
    port: Annotated[int, typer.Option(help="SuperLink port (0: any free port).")] = 0,
) -> None:
    """Start the rehearsal federation in the background: SuperLink and one SuperNode per hospital."""
    if (run_dir / "federation.json").exists() and any(map(is_running, Federation.load(run_dir).processes.values())):
        raise typer.BadParameter(f"a federation from {run_dir} still runs: stop it first", param_hint="--run-dir")
    sites = dict(_site_and_folder(entry, data_dir) for entry in site or DEFAULT_SITES)
    made = make_credentials(folder, sites)
    federation = start_federation(run_dir, made, sites, port=port or None)
    typer.echo(f"SuperLink on {federation.address}; SuperNodes: {', '.join(sites)}; logs in {run_dir / 'logs'}")


@cli.command()
def submit(
    run_dir: RunDir = DEFAULT_RUN_DIR,
    run_config: Annotated[str, typer.Option(help="Overrides: 'key=value key=value' (TOML values).")] = "",
    app: Annotated[Path, typer.Option(help="The Flower app (a folder with pyproject.toml).")] = REPO_ROOT,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to finish.")] = 1800.0,
) -> None:
    """Submit a run to the started federation and wait for it; print its logs if it fails."""
    federation = Federation.load(run_dir)
    run_id = federation.submit(parse_config_args([run_config] if run_config else None), app=app)
    typer.echo(f"run {run_id} submitted; waiting (logs: {run_dir / 'runs' / f'{run_id}.log'})")
    _report(federation.wait(run_id, timeout=timeout))


@cli.command()
def stop(run_dir: RunDir = DEFAULT_RUN_DIR) -> None:
    """Stop every process the federation in this run folder started."""
    Federation.load(run_dir).stop()
    typer.echo("stopped")


@cli.command("simulate")
def simulate_command(
    data_dir: Annotated[Path, typer.Option(help="Folder holding sites/<site>/features for every site.")],
    flwr_home: Annotated[Path, typer.Option(help="FLWR_HOME of this simulation.")] = DEFAULT_RUN_DIR / "simulation",
    site: Annotated[list[str] | None, typer.Option(help="A simulated hospital (one virtual SuperNode each).")] = None,
    run_config: Annotated[str, typer.Option(help="More overrides: 'key=value key=value'.")] = "",
    app: Annotated[Path, typer.Option(help="The Flower app.")] = REPO_ROOT,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to finish.")] = 1800.0,
) -> None:
    """Run the app on the simulation runtime, one virtual SuperNode per site; print its logs if it fails."""
    sites = list(site or DEFAULT_SITES)
    config = {"sites": ",".join(sites), "data-dir": str(data_dir.resolve()), "min-nodes": len(sites),
              "federation-dir": str((flwr_home / "federation").resolve())}  # fmt: skip
    config |= parse_config_args([run_config] if run_config else None)
    _report(simulate(config, flwr_home=flwr_home, app=app, num_supernodes=len(sites), timeout=timeout))


def _site_and_folder(entry: str, default: Path) -> tuple[str, Path]:
    name, _, folder = entry.partition("=")
    return name, Path(folder) if folder else default


def _report(result: RunResult) -> None:
    if not result.succeeded:
        typer.echo(result.logs, err=True)
        typer.echo(f"run {result.run_id} ended {result.status}: {result.details}", err=True)
        raise typer.Exit(1)
    typer.echo(f"run {result.run_id} completed in {result.elapsed:.0f} s")


def main() -> None:
    """The command line, with Flower failures reported as one message (what failed, which log) and exit code 1."""
    try:
        code = cli(standalone_mode=False)  # a command's `typer.Exit(n)` comes back as n
    except click.ClickException as error:
        error.show()
        raise SystemExit(error.exit_code) from None
    except click.exceptions.Exit as done:
        raise SystemExit(done.exit_code) from None
    except (DeploymentError, CredentialsError) as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
