"""backend=ray: the rules for Ray's resources and queue (pure, fast), then federations on a local Ray (slow).

The slow cases share one local Ray of 2 CPUs started here (no dashboard, nothing beyond this machine); the simulator
uses a connection the process already has. They skip, saying why, only where ray is not installed.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_fhe.simulate.__main__ import main
from lightning_fhe.simulate.config import ConfigError, load_experiment
from lightning_fhe.simulate.orchestrate import GLOBAL_MODEL, SimulationError, run_setting, threads_per_site
from lightning_fhe.simulate.ray_backend import (
    ResourceError,
    read_kit,
    room_problem,
    site_request,
    site_slots,
    task_options,
    write_kit,
)

REPO = Path(__file__).resolve().parents[1]
CLASSIFICATION = REPO / "configs" / "experiments" / "noniid_classification.yaml"
QUICKSTART = REPO / "configs" / "experiments" / "quickstart.yaml"


# ------------------------------------------------------------------------------------------------ rules (pure)


def test_site_resources_become_ray_names_and_task_options():
    request = site_request({"num_cpus": 1, "num_gpus": 0.25, "memory": 2_000_000_000, "hospital_a": 1})
    assert request == {"CPU": 1.0, "GPU": 0.25, "memory": 2e9, "hospital_a": 1.0}
    assert task_options(request) == {
        "num_cpus": 1.0, "num_gpus": 0.25, "memory": 2_000_000_000, "resources": {"hospital_a": 1.0}
    }  # fmt: skip
    assert site_request({"num_cpus": 0.0625, "num_gpus": 0}) == {"CPU": 0.0625}  # 0 asks for nothing
    assert task_options({"CPU": 0.0625}) == {"num_cpus": 0.0625, "num_gpus": 0, "memory": None}


@pytest.mark.parametrize(
    "resources, message",
    [
        (None, "sites.resources: expected a mapping of Ray resources such as {num_cpus: 1}, got None"),
        ({"num_cpus": -1}, "sites.resources.num_cpus: expected a number >= 0, got -1"),
        ({"num_cpus": "one"}, "sites.resources.num_cpus: expected a number >= 0, got 'one'"),
        ({"num_gpus": 1.5}, "sites.resources.num_gpus: more than one GPU must be a whole number, got 1.5"),
        ({"num_cpus": 0.00001}, "sites.resources.num_cpus: 1e-05 is finer than Ray's smallest amount, 0.0001"),
        ({"CPU": 1}, "sites.resources.CPU: write num_cpus, as in ray.remote()"),
    ],
)
def test_resources_ray_would_refuse_are_refused_by_key(resources, message):
    with pytest.raises(ResourceError) as error:
        site_request(resources)
    assert str(error.value) == message


def test_slots_count_each_node_for_itself():
    assert site_slots([{"CPU": 2.0}], {"CPU": 1.0}) == 2
    assert site_slots([{"CPU": 2.0}], {"CPU": 0.0625}) == 32
    assert site_slots([{"CPU": 1.5}, {"CPU": 1.5}], {"CPU": 1.0}) == 2  # 3 CPUs in all, but 1 task per node
    assert site_slots([{"CPU": 8.0, "GPU": 1.0}], {"CPU": 1.0, "GPU": 0.25}) == 4  # the scarcest resource decides
    assert site_slots([{"CPU": 8.0}], {"CPU": 1.0, "GPU": 0.25}) == 0
    assert site_slots([{"CPU": 2.0}], {}) is None  # asks for nothing: no limit


def test_every_site_must_fit_at_once_and_the_error_says_what_fits():
    assert room_problem(2, [{"CPU": 2.0}], {"CPU": 1.0}) is None
    assert room_problem(32, [{"CPU": 2.0}], {"CPU": 0.0625}) is None
    problem = room_problem(32, [{"CPU": 2.0}], {"CPU": 1.0})
    assert problem.startswith(
        "Ray has room for 2 of the 32 sites at once (each site asks for CPU 1; the nodes have CPU 2)"
    )
    assert "set sites.resources.num_cpus=0.0625" in problem
    # what it suggests does fit, on uneven nodes too
    assert "sites.resources.num_cpus=0.6666" in room_problem(3, [{"CPU": 2.0}], {"CPU": 0.7})
    assert site_slots([{"CPU": 2.0}], {"CPU": 0.6666}) >= 3
    problem = room_problem(5, [{"CPU": 2.0}, {"CPU": 1.0}], {"CPU": 1.0})
    assert "(each site asks for CPU 1; the nodes have CPU 3)" in problem
    assert "set sites.resources.num_cpus=0.5 (" in problem  # 4 + 2 tasks; 0.6 would give 3 + 1
    problem = room_problem(4, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}], {"CPU": 1.0, "GPU": 0.5})
    assert "the nodes have CPU 16, GPU 1" in problem and "set sites.resources.num_gpus=0.25 (" in problem
    assert "num_cpus" not in problem.split("set ")[1]  # CPUs are not what is short
    problem = room_problem(2, [{"CPU": 8.0}], {"CPU": 1.0, "GPU": 1.0})
    assert "set sites.resources.num_gpus=0 (no node has enough GPU)" in problem


def test_a_ray_site_uses_the_whole_cpus_its_task_holds():
    config = {"backend": "ray", "trainer": {"num_threads": None}, "federation": {"sites": 32}}
    assert threads_per_site({**config, "sites": {"resources": {"num_cpus": 0.0625}}}, cores=2) == 1
    assert threads_per_site({**config, "sites": {"resources": {"num_cpus": 4}}}, cores=2) == 4
    assert threads_per_site({**config, "sites": {"resources": {"num_gpus": 1}}}, cores=2) == 1
    assert threads_per_site({**config, "trainer": {"num_threads": 2}, "sites": {"resources": {}}}) == 2


def test_a_kit_travels_whole_with_its_file_modes(tmp_path):
    kit = tmp_path / "site-1"
    (kit / "sub").mkdir(parents=True)
    (kit / "site.key").write_bytes(b"secret")
    (kit / "site.key").chmod(0o600)
    (kit / "sub" / "ca.pem").write_bytes(b"ca")
    (kit / "sub" / "ca.pem").chmod(0o644)
    copy = write_kit(read_kit(kit), tmp_path / "copy" / "site-1")
    assert (copy / "site.key").read_bytes() == b"secret" and (copy / "sub" / "ca.pem").read_bytes() == b"ca"
    assert (copy / "site.key").stat().st_mode & 0o777 == 0o600
    assert (copy / "sub" / "ca.pem").stat().st_mode & 0o777 == 0o644
    assert copy.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backend=ray", "sites.resources.num_gpus=1.5"], "command line: sites.resources.num_gpus: more than one GPU"),
        (["backend=ray", "ray.address=ray://head:10001"], "command line: ray.address: ray://head:10001: Ray Client"),
        (["backend=ray", "ray.address=auto", "ray.num_cpus=2"], "command line: ray.num_cpus: only for a local Ray"),
        (["backend=ray", "ray.address=head.example.org"], "command line: ray.address: expected auto or HOST:PORT"),
        (["ray.address=auto"], "command line: ray.address: set, but backend is 'process'; add backend=ray"),
        (["backend=ray", "ray.server_port=70000"], "command line: ray.server_port: expected a TCP port, 0 to 65535"),
        (["ray.server_port=8443"], "command line: ray.server_port: set, but backend is 'process'"),
        (["backend=slurm"], "command line: backend: expected one of 'process', 'ray', got 'slurm'"),
        (["backend=ray", "ray.start_timeout_s=0"], "command line: ray.start_timeout_s: expected a number in (0, inf)"),
    ],
)
def test_ray_keys_are_validated_with_the_others(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_experiment(CLASSIFICATION, overrides)
    assert message in str(error.value)


def test_backend_ray_without_ray_says_how_to_install_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"backend: ray needs the ray package, .*pip install 'lightning_fhe\[ray\]'"):
        load_experiment(CLASSIFICATION, ["backend=ray"])
    assert load_experiment(CLASSIFICATION).config["backend"] == "process"  # the default needs no ray


# ------------------------------------------------------------------------------------------------ on a local Ray


@pytest.fixture(scope="module")
def local_ray():
    reason = "backend=ray needs ray: pip install 'lightning_fhe[ray]'"
    ray = pytest.importorskip("ray", reason=reason, exc_type=ImportError)  # not installed, or not importable
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def small(tmp_path: Path, *overrides: str) -> list[str]:
    """The quickstart's shape, 2 sites and 2 rounds, with an MLP on synthetic features: seconds per run."""
    return [
        "federation.sites=2", "federation.rounds=2", "data.init_args.num_samples=2000", "experiment.timeout_s=240",
        *overrides,
    ]  # fmt: skip


@pytest.mark.slow
def test_the_quickstart_on_ray_reaches_the_process_backends_global_model_bit_for_bit(local_ray, tmp_path, capsys):
    for backend in ("process", "ray"):
        overrides = [  # the quickstart's 2 sites and 2 rounds, on smaller synthetic volumes (as test_simulate.py)
            "federation.rounds=2", "federation.local_epochs=1", "data.init_args.synthetic.num_cases=8",
            "data.init_args.synthetic.size=[32,32,32]", f"data.init_args.synthetic.cache_dir={tmp_path / 'data'}",
            f"backend={backend}", f"experiment.output_dir={tmp_path / backend}",
        ]  # fmt: skip
        code = main([str(QUICKSTART), *overrides])
        out = capsys.readouterr()
        assert code == 0, out.out[-3000:] + out.err[-3000:]
    assert "2 site tasks hold their Ray slots on 1 node(s)" in out.out and "a Ray actor on this node" in out.out
    assert "[he_full] round 2/2: val/dice" in out.out
    process = torch.load(tmp_path / "process" / "he_full" / GLOBAL_MODEL, weights_only=True)
    on_ray = torch.load(tmp_path / "ray" / "he_full" / GLOBAL_MODEL, weights_only=True)
    assert process.keys() == on_ray.keys() and len(process) > 0
    for name, tensor in process.items():
        assert torch.equal(tensor, on_ray[name]), name
    written = {p.name for p in (tmp_path / "ray" / "he_full").iterdir()}
    assert {"config.yaml", "server.log", "site-1.log", "site-2.log", "site-1.jsonl", "site-2.jsonl"} <= written
    assert not list((tmp_path / "ray").glob("**/*.tenseal"))  # the kits (secret key) never touch the output folder


@pytest.mark.slow
def test_a_local_ray_without_room_for_every_site_is_refused_before_anything_starts(local_ray, tmp_path):
    config = load_experiment(CLASSIFICATION, small(tmp_path, "backend=ray", "federation.sites=4")).config
    started = time.monotonic()
    with pytest.raises(SimulationError, match=r"Ray has room for 2 of the 4 sites at once .*num_cpus=0\.5"):
        run_setting("he_full", config, tmp_path / "out", echo=lambda line: None)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "out" / "server.log").exists()


@pytest.mark.slow
def test_sites_left_in_rays_queue_fail_at_the_start_timeout_and_the_server_never_starts(local_ray, tmp_path):
    # ray.address set: a cluster that an autoscaler might grow, so the run waits for room instead of refusing.
    overrides = ("backend=ray", "federation.sites=3", "ray.address=auto", "ray.start_timeout_s=5")
    config = load_experiment(CLASSIFICATION, small(tmp_path, *overrides)).config
    lines: list[str] = []
    queued = r"1 of 3 site tasks still wait in Ray's queue after ray.start_timeout_s=5 s"
    with pytest.raises(SimulationError, match=queued):
        run_setting("he_full", config, tmp_path / "out", echo=lines.append)
    assert any("Ray has room for 2 of the 3 sites at once" in line for line in lines)
    assert not (tmp_path / "out" / "server.log").exists()  # nothing was timed while sites queued
    _wait_until_free(local_ray)  # the two tasks that held slots returned them


@pytest.mark.slow
def test_a_site_whose_ray_task_dies_ends_the_run_with_its_log_and_is_not_resubmitted(local_ray, tmp_path):
    psutil = pytest.importorskip("psutil")
    config = load_experiment(CLASSIFICATION, small(tmp_path, "backend=ray", "federation.rounds=40")).config
    out = tmp_path / "out"
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            run_setting("he_full", config, out, echo=lambda line: None)
        except BaseException as err:  # noqa: BLE001 - checked below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (out / "site-2.jsonl").is_file() or not (out / "site-2.jsonl").read_text():  # round 1 is over
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.2)
    title = "ray::lightning_fhe he_full site-2"  # the name the backend gives site-2's task
    worker = next(p for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or []))
    site = worker.children()
    worker.kill()  # as an out-of-memory killer or a lost node would
    killed = time.monotonic()
    thread.join(60)
    assert not thread.is_alive()
    error = outcome["error"]
    assert isinstance(error, SimulationError)
    assert "[he_full] site-2 failed in its Ray task (WorkerCrashedError" in str(error)
    assert "fhe round 1/40" in error.log_tail and error.log_path == out / "site-2.log"
    assert time.monotonic() - killed < 30
    assert (out / "site-2.log").read_text().count("joined as 'site-2'") == 1  # Ray did not run it again
    psutil.wait_procs(site, timeout=10)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in site)  # it died with its task
    _wait_until_free(local_ray)


def _wait_until_free(ray, timeout_s: float = 30) -> None:
    """Until the local Ray's CPUs are all free again, so that the next case starts from an idle Ray."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
