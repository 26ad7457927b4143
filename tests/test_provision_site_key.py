"""Provisioning with ``he: {key: sites}``: no kit holds a CKKS secret key, and a site saves the one the sites made."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import tenseal as ts

from lightning_fhe.he.context import HEContext
from lightning_fhe.provision import (
    KitError,
    ProvisionConfigError,
    key_fingerprint,
    load_provision_config,
    load_server_kit,
    load_site_kit,
    provision,
    save_site_key,
    stage_site_key,
    staged_site_key,
)
from lightning_fhe.provision.__main__ import main as provision_main

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "provision.yaml"
SITES = ("site-1", "site-2")


@pytest.fixture()
def kits(tmp_path: Path) -> Path:
    provision(load_provision_config(CONFIG_FILE, ["he.key=sites", f"clients=[{','.join(SITES)}]"]), tmp_path)
    return tmp_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_he_key_defaults_to_provisioned_and_refuses_other_words() -> None:
    assert load_provision_config(CONFIG_FILE).he_key == "provisioned"
    assert load_provision_config(CONFIG_FILE, ["he.key=sites"]).to_dict()["he"]["key"] == "sites"
    with pytest.raises(ProvisionConfigError, match=r"he\.key: 'server' is not one of \['provisioned', 'sites'\]"):
        load_provision_config(CONFIG_FILE, ["he.key=server"])


def test_no_kit_holds_a_secret_key(kits: Path) -> None:
    tenseal_files = sorted(kits.rglob("*.tenseal"))
    assert [str(p.relative_to(kits)) for p in tenseal_files] == [
        "server/he_params.tenseal",
        "site-1/he_params.tenseal",
        "site-2/he_params.tenseal",
    ]
    for path in tenseal_files:
        context = ts.context_from(path.read_bytes())
        assert not context.has_secret_key() and not context.is_private(), path
    for site in SITES:
        kit = load_site_kit(kits / site)
        assert kit.key_source == "sites" and kit.awaits_site_key and kit.he_context is None
        assert kit.key_fingerprint == ""
        assert "he.key: sites" in (kits / site / "site.yaml").read_text()
        with pytest.raises(KitError, match="no CKKS secret key yet: with he.key: sites the sites make it"):
            kit.secret_context()
    server = load_server_kit(kits / "server")
    assert not server.he_context.has_secret_key
    assert {load_site_kit(kits / s).he_fingerprint for s in SITES} == {server.he_fingerprint}


def test_provisioned_kits_say_so_and_load_as_before(tmp_path: Path) -> None:
    provision(load_provision_config(CONFIG_FILE), tmp_path)
    kit = load_site_kit(tmp_path / "site-1")
    assert kit.key_source == "provisioned" and not kit.awaits_site_key and kit.key_fingerprint == ""
    assert kit.secret_context() is kit.he_context and kit.he_context.has_secret_key
    with pytest.raises(KitError, match="its CKKS key was provisioned"):
        save_site_key(tmp_path / "site-1", HEContext.generate(kit.params))


def test_a_saved_key_loads_like_a_provisioned_one(kits: Path) -> None:
    kit = load_site_kit(kits / "site-1")
    context = HEContext.generate(kit.params)
    saved = save_site_key(kits / "site-1", context)
    assert _mode(kits / "site-1" / "he_context.tenseal") == 0o600
    assert not saved.awaits_site_key and saved.he_context.has_secret_key
    assert saved.key_fingerprint == key_fingerprint(context) == key_fingerprint(saved.he_context)
    assert len(saved.key_fingerprint) == 64
    assert saved.he_context.serialize(True) == context.serialize(True)
    again = load_site_kit(kits / "site-1")
    assert again.key_fingerprint == saved.key_fingerprint
    assert not list((kits / "site-1").glob(".*.tmp"))  # no staging file left
    save_site_key(kits / "site-1", saved.he_context)  # the same key again: harmless
    with pytest.raises(KitError, match="already holds the sites' key .*; refusing to replace it"):
        save_site_key(kits / "site-1", HEContext.generate(kit.params))


def test_a_replaced_or_missing_key_file_is_named(kits: Path) -> None:
    folder = kits / "site-1"
    save_site_key(folder, HEContext.generate(load_site_kit(folder).params))
    key_file = folder / "he_context.tenseal"
    original = key_file.read_bytes()
    key_file.write_bytes(HEContext.generate(load_site_kit(kits / "site-2").params).serialize(True))
    with pytest.raises(KitError, match="does not hold the key site.yaml names .*: the file was replaced or damaged"):
        load_site_kit(folder)
    key_file.unlink()
    with pytest.raises(KitError, match="he_context.tenseal is missing: restore it from a backup, or delete the"):
        load_site_kit(folder)
    key_file.write_bytes(original)
    assert load_site_kit(folder).he_context is not None


def test_a_key_file_without_its_fingerprint_counts_as_no_key(kits: Path) -> None:
    """Saving writes the key file, then the fingerprint: interrupted in between, the site still awaits its key."""
    folder = kits / "site-2"
    (folder / "he_context.tenseal").write_bytes(HEContext.generate(load_site_kit(folder).params).serialize(True))
    assert load_site_kit(folder).awaits_site_key
    other = HEContext.generate(load_site_kit(folder).params)
    assert save_site_key(folder, other).key_fingerprint == key_fingerprint(other)


def test_a_staged_key_is_written_but_not_yet_the_kits(kits: Path) -> None:
    """The site that makes the key stages it before sharing it: the kit still awaits its key, and the staged key is
    what it shares (again) and saves."""
    folder = kits / "site-1"
    assert staged_site_key(folder) is None
    context = HEContext.generate(load_site_kit(folder).params)
    stage_site_key(folder, context)
    assert _mode(folder / "he_context.tenseal") == 0o600
    assert load_site_kit(folder).awaits_site_key
    assert key_fingerprint(staged_site_key(folder)) == key_fingerprint(context)
    (folder / "he_context.tenseal").write_bytes(b"half a key")
    assert staged_site_key(folder) is None  # unreadable: made anew
    save_site_key(folder, context)
    assert staged_site_key(folder) is None  # saved: no longer staged


def test_cli_summary_says_no_kit_holds_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert provision_main([str(CONFIG_FILE), "--out", str(tmp_path), "he.key=sites"]) == 0
    out = capsys.readouterr().out
    assert "ca.crt, client.crt, client.key, he_params.tenseal, site.yaml" in out
    assert "no kit holds a CKKS secret key" in out and "SECRET key, the same" not in out
