"""The federation as processes: credentials, a TLS SuperLink with authenticated hospital SuperNodes on localhost.

The slow tests run the real thing: `flower-superlink` with TLS and `--enable-supernode-auth`, three registered
`flower-supernode`s each reading only its own hospital's folder, runs submitted with `flwr run` and followed with
`flwr log --stream`; and the simulation runtime behind a managed local SuperLink. Every process they start is
stopped, pass or fail.
"""

from __future__ import annotations

import io
import ipaddress
import os
import shutil
import stat
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.build import build_fab_from_disk

from data_contracts.schema import IMAGE_FEATURE
from federated.credentials import Credentials, make_credentials, make_node_key
from federated.deploy import (
    REPO_ROOT,
    Federation,
    ProcessRecord,
    exit_code,
    is_running,
    kill_process,
    local_superlinks,
    simulate,
    spawn,
    stage_app,
    start_federation,
    stop_process,
)
from federated.privacy import PrivacyLedger
from federated.registry import Registry
from federated.twin_app import DEFAULT_SITES, DEFAULTS
from flows.demo_sites.generate import SitePaths, generate_sites
from flows.demo_sites.profile import load_profiles
from flows.features import build_features, write_features
from flows.ingest.mapping import mapping_for
from flows.ingest.records import ingest_records

PRIVATE_FILES = ("ca.key", "superlink.key", "supernodes/aurelia.key", "supernodes/lakeside.key")


# ------------------------------------------------------------------------------------------------- credentials


def test_credentials_are_made_once_with_private_keys_0600_and_localhost_sans(tmp_path: Path) -> None:
    """A CA, a SuperLink certificate for localhost/127.0.0.1 and site keys appear; a second call overwrites nothing."""
    made = make_credentials(tmp_path / "secrets", ["aurelia", "lakeside"])
    for relative in PRIVATE_FILES:
        assert stat.S_IMODE((made.folder / relative).stat().st_mode) == 0o600, relative
    cert = x509.load_pem_x509_certificate(made.superlink_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    private = load_ssh_private_key(made.node_private_key("aurelia").read_bytes(), password=None)
    public = load_ssh_public_key(made.node_public_key("aurelia").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert public == private.public_key()

    before = {p: p.read_bytes() for p in made.folder.rglob("*") if p.is_file()}
    again = make_credentials(tmp_path / "secrets", ["aurelia", "lakeside", "northbridge"])
    assert all(path.read_bytes() == content for path, content in before.items())
    assert again.node_private_key("northbridge").exists()
    make_credentials(tmp_path / "secrets", ["aurelia"], overwrite=True)
    assert made.ca_cert.read_bytes() != before[made.ca_cert]


def test_a_lost_public_key_is_derived_again_from_its_private_key(tmp_path: Path) -> None:
    """Deleting a site's .pub and asking again restores the same public key, keeping the registered private key."""
    credentials = Credentials(tmp_path)
    make_node_key(credentials, "northbridge")
    private = credentials.node_private_key("northbridge").read_bytes()
    public = credentials.node_public_key("northbridge").read_bytes()
    credentials.node_public_key("northbridge").unlink()
    make_node_key(credentials, "northbridge")
    assert credentials.node_private_key("northbridge").read_bytes() == private
    assert credentials.node_public_key("northbridge").read_bytes() == public


# ---------------------------------------------------------------------------------------------- app, processes


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # flwr's own FAB builder
def test_staged_app_builds_the_same_fab_without_ignored_folders(tmp_path: Path) -> None:
    """Staging keeps exactly what `flwr run` would package: the same FAB bytes, no .venv/ or data/ files."""
    repo = tmp_path / "repo"
    (repo / "federated").mkdir(parents=True)
    (repo / "pyproject.toml").write_bytes((REPO_ROOT / "pyproject.toml").read_bytes())
    (repo / ".gitignore").write_text(".venv/\ndata/\n*.key\n")
    (repo / "federated" / "twin_app.py").write_text("x = 1\n")
    (repo / "federated" / "notes.md").write_text("kept\n")
    for ignored in (".venv/lib/site.py", "data/sites/aurelia/features.json", "federated/lost.key"):
        (repo / ignored).parent.mkdir(parents=True, exist_ok=True)
        (repo / ignored).write_text("{}\n")
    staged = stage_app(repo, tmp_path / "staged")
    assert not (staged / ".venv").exists() and not (staged / "data").exists()
    assert not (staged / "federated" / "lost.key").exists()
    fab = build_fab_from_disk(staged)
    assert fab == build_fab_from_disk(repo)
    assert {"federated/twin_app.py", "federated/notes.md"} <= set(zipfile.ZipFile(io.BytesIO(fab)).namelist())


def test_stopping_a_process_stops_its_whole_tree_even_other_sessions(tmp_path: Path) -> None:
    """A child that moved to a session of its own (as the SuperLink's SuperExec does) is stopped with its parent."""
    script = "setsid sleep 300 & sleep 300 & echo started; wait"
    record = spawn("tree", ["bash", "-c", script], env=os.environ, log=tmp_path / "tree.log", cwd=tmp_path)
    deadline = time.monotonic() + 10
    while "started" not in (tmp_path / "tree.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    children = _children_of(record.pid)
    assert len(children) == 2
    stop_process(record, grace=5)
    assert not is_running(record)
    assert all(_gone(pid) for pid in children)


def test_stopping_a_dead_process_stops_what_it_left_in_its_session(tmp_path: Path) -> None:
    """A child orphaned by its dead parent (as a crashed SuperNode's SuperExec is) is still found and stopped."""
    log = tmp_path / "orphan.log"
    record = spawn("orphan", ["bash", "-c", "sleep 300 & echo $!"], env=os.environ, log=log, cwd=tmp_path)
    deadline = time.monotonic() + 10
    while (is_running(record) or not log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphan = int(log.read_text().split()[0])
    assert not is_running(record) and not _gone(orphan)
    stop_process(record, grace=5)
    assert _gone(orphan)


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie waits for init to reap it; it runs nothing


# --------------------------------------------------------------------------------------- the real deployment


@pytest.fixture(scope="module")
def site_features(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small sites' features (6 patients x 2 days each), as each site flow would have written them."""
    scratch = tmp_path_factory.mktemp("drops")
    generate_sites([p.with_overrides(patients=6, days=2) for p in load_profiles()], scratch, workers=2)
    folders = {}
    for site in DEFAULT_SITES:
        batch = ingest_records(SitePaths.under(scratch, site).drop, mapping_for(site), secret=bytes(range(32)),
                               workdir=scratch / "work" / site, build_docs=False)  # fmt: skip
        features = build_features(batch.tables | {"image_feature": IMAGE_FEATURE.empty()})
        folders[site] = scratch / "features" / site
        write_features(features, folders[site])
    return folders


@pytest.fixture
def hospitals(tmp_path: Path, site_features: dict[str, Path]) -> dict[str, Path]:
    """Each hospital's own data folder holding only its site's features, and a fresh (empty) privacy ledger."""
    folders = {site: tmp_path / f"hospital-{site}" for site in DEFAULT_SITES}
    for site, folder in folders.items():
        shutil.copytree(site_features[site], folder / "sites" / site / "features")
    return folders


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """The federation's CA, SuperLink certificate and the three hospitals' keys."""
    return make_credentials(tmp_path_factory.mktemp("secrets"), DEFAULT_SITES)


@pytest.fixture
def federation(tmp_path: Path, hospitals: dict[str, Path], credentials: Credentials) -> Iterator[Federation]:
    """A running SuperLink and three online SuperNodes; every process stopped afterwards, pass or fail."""
    started = start_federation(tmp_path / "run", credentials, hospitals)
    try:
        yield started
    finally:
        started.stop()
        assert not any(is_running(p) for p in started.processes.values())
        assert not _processes_mentioning(f"127.0.0.1:{started.port}"), "a process of this federation outlived stop()"


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (every SuperNode, SuperExec and App names the port)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and text in argv and not _gone(int(entry.name)):
            found.append(argv)
    return found


def ledger(site: str, data_dir: Path) -> dict[str, float | int | str]:
    """A hospital's privacy ledger summary, read from its own folder."""
    return PrivacyLedger(data_dir / "sites" / site / "privacy_ledger.json", site_id=site,
                         epsilon_budget=DEFAULTS["epsilon-budget"], delta=DEFAULTS["delta"]).summary()  # fmt: skip


@pytest.mark.slow
def test_three_authenticated_hospitals_train_two_rounds_over_tls(
    federation: Federation, hospitals: dict[str, Path], tmp_path: Path
) -> None:
    """Two rounds over TLS register a model trained by all three; ledgers match it; an unknown key is refused."""
    run_id = federation.submit({"num-server-rounds": 2})
    intruder_keys = Credentials(tmp_path / "intruder")
    make_node_key(intruder_keys, "intruder")
    intruder = federation.start_supernode("aurelia", private_key=intruder_keys.node_private_key("intruder"),
                                          name="intruder")  # fmt: skip
    federation.wait(run_id, timeout=900).check()

    model = Registry(federation.federation_dir).latest()
    assert model is not None
    assert model.metadata["rounds"] == 2 and set(model.metadata["sites"]) == set(DEFAULT_SITES)
    budget = DEFAULTS["epsilon-budget"]
    for site, data_dir in hospitals.items():
        registered = model.metadata["sites"][site]
        assert registered["examples"] > 0 and 0 < registered["epsilon_spent"] <= budget
        kept = ledger(site, data_dir)
        assert float(kept["epsilon_spent"]) == pytest.approx(registered["epsilon_spent"]) and kept["rounds"] == 2
    _assert_refused(intruder)


def _assert_refused(intruder: ProcessRecord) -> None:
    """The SuperNode with an unregistered key gave up: the SuperLink would not activate it."""
    deadline = time.monotonic() + 120
    while is_running(intruder) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not is_running(intruder)
    assert exit_code(intruder) not in (0, None)
    assert "Failed to activate SuperNode" in Path(intruder.log).read_text()


@pytest.mark.slow
def test_a_hospital_lost_after_round_one_leaves_the_others_to_finish(
    federation: Federation, hospitals: dict[str, Path]
) -> None:
    """Killing lakeside's SuperNode after round 1 still completes the run; round 2 is aurelia and northbridge's."""
    run_id = federation.submit({"num-server-rounds": 2})
    first_round = federation.federation_dir / "checkpoints" / "round-0001"
    deadline = time.monotonic() + 600
    while not first_round.exists():
        assert time.monotonic() < deadline, "round 1 was not checkpointed within 600 s"
        time.sleep(0.2)
    kill_process(federation.processes["supernode-lakeside"])
    federation.wait(run_id, timeout=900).check()

    model = Registry(federation.federation_dir).latest()
    assert model is not None and model.metadata["rounds"] == 2
    first, second = (entry["sites"] for entry in model.metadata["history"])
    assert {site for site, part in first.items() if part["status"] == "trained"} == set(DEFAULT_SITES)
    assert {site for site, part in second.items() if part["status"] == "trained"} == {"aurelia", "northbridge"}
    # The SuperLink answers for the unreachable node itself: that reply must still be put down to lakeside.
    assert set(second) <= set(DEFAULT_SITES) and set(model.metadata["sites"]) == set(DEFAULT_SITES)
    lost, kept = model.metadata["sites"]["lakeside"], ledger("lakeside", hospitals["lakeside"])
    # The ledger may hold round 2 too, had lakeside started it before dying: it never counts less than was spent.
    assert lost["rounds_trained"] == 1 and 0 < lost["epsilon_spent"] <= float(kept["epsilon_spent"])


@pytest.mark.slow
def test_simulation_runs_three_virtual_hospitals_and_stops_its_superlink(
    site_features: dict[str, Path], tmp_path: Path
) -> None:
    """`flwr run` on the simulation runtime registers a 2-round model of the three sites; no SuperLink is left."""
    data_dir = tmp_path / "data"
    for site, features in site_features.items():
        shutil.copytree(features, data_dir / "sites" / site / "features")
    home = tmp_path / "flwr-home"
    config = {"sites": ",".join(DEFAULT_SITES), "data-dir": str(data_dir), "num-server-rounds": 2,
              "federation-dir": str(tmp_path / "federation")}  # fmt: skip
    try:
        simulate(config, flwr_home=home, num_supernodes=len(DEFAULT_SITES), timeout=900).check()
    finally:
        assert not local_superlinks(home)
    model = Registry(tmp_path / "federation").latest()
    assert model is not None and model.metadata["rounds"] == 2 and set(model.metadata["sites"]) == set(DEFAULT_SITES)
