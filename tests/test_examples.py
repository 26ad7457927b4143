"""The examples stay runnable."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_federate_existing_trainer_runs_a_local_federation():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "federate_existing_trainer.py"), "--local"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("federated training done after 6 epochs") == 2
    assert result.stderr.count("fhe round 3/3") == 2


@pytest.mark.slow
def test_lightning_cli_example_federates_two_sites_from_yaml(tmp_path):
    """examples/lightning_cli: HEFederation (with a strategy) from a LightningCLI config, two sites, real server."""
    import csv

    import yaml

    from lightning_fhe.provision import load_provision_config, load_server_kit, provision
    from lightning_fhe.server.app import AggregatorServer
    from lightning_fhe.server.config import load_server_config

    kits = load_provision_config(REPO / "configs" / "provision.yaml", ["clients=[site-1,site-2]"])
    provision(kits, tmp_path / "kits")
    config = load_server_config(None, ["port=0", "bind=127.0.0.1", f"state_dir={tmp_path / 'state'}", "rounds=3"])
    server = AggregatorServer(config, load_server_kit(tmp_path / "kits" / "server"))
    port = server.start()
    example = yaml.safe_load((REPO / "examples" / "lightning_cli" / "site-1.yaml").read_text())
    processes = []
    try:
        for index in (0, 1):
            site = yaml.safe_load(yaml.safe_dump(example))
            site["trainer"]["logger"]["init_args"]["save_dir"] = f"logs/site-{index + 1}"
            federation = site["trainer"]["callbacks"][0]["init_args"]
            federation.update(kit=f"kits/site-{index + 1}", server=f"localhost:{port}")
            site["data"]["init_args"]["site_index"] = index
            (tmp_path / f"site-{index + 1}.yaml").write_text(yaml.safe_dump(site))
            command = [sys.executable, str(REPO / "examples" / "lightning_cli" / "site.py"), "fit"]
            command += ["--config", f"site-{index + 1}.yaml"]
            pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
            processes.append(subprocess.Popen(command, cwd=tmp_path, **pipes))
        for process in processes:
            output, _ = process.communicate(timeout=300)
            assert process.returncode == 0, output[-3000:]
            assert "fhe round 3/3" in output and "strategy FedAdam(lr=0.01" in output
            encrypted = "encrypted: 4 tensors, 2,762 values, 11,048 bytes: net.0.{weight,bias}, net.2.{weight,bias};"
            assert encrypted in output  # which tensors travel encrypted, once, at join
        assert server.wait(timeout=30) == 0
    finally:
        for process in processes:
            process.kill()
        server.stop()
    for index in (1, 2):
        (metrics,) = (tmp_path / "logs" / f"site-{index}").glob("**/metrics.csv")
        with metrics.open() as f:
            rows = list(csv.DictReader(f))
        assert [float(r["fhe/round"]) for r in rows if r.get("fhe/round")] == [1.0, 2.0, 3.0]
        assert len([r for r in rows if r.get("fhe/global/val/acc")]) == 2  # rounds 1 and 2, carried by 2 and 3
