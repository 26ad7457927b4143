import pytest

from lightning_fhe.he import CKKSParams, HEConfigError, HEContext, HEKeyError


def test_seed_block_is_accepted_and_describes_its_capacity():
    params = CKKSParams.from_mapping(
        {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40, "scheme": "CKKS"}
    )
    assert params.values_per_ciphertext == 8192
    assert params.headroom_bits == 19
    assert params.max_abs_sum == 2.0**19


@pytest.mark.parametrize(
    "config, field, words",
    [
        ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 40, 40]}, "coeff_mod_bit_sizes", "128-bit"),
        ({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 60, 60, 60]}, "coeff_mod_bit_sizes", "128-bit"),
        ({"poly_modulus_degree": 5000}, "poly_modulus_degree", "one of"),
        ({"coeff_mod_bit_sizes": [60]}, "coeff_mod_bit_sizes", "at least two"),
        ({"coeff_mod_bit_sizes": [70, 40, 40]}, "coeff_mod_bit_sizes", "20 to 60"),
        ({"scale_bits": 58}, "scale_bits", "headroom"),
        ({"scheme": "BFV"}, "scheme", "CKKS"),
        ({"poly_modulus_degre": 8192}, "unknown key", "poly_modulus_degre"),
        ({"coeff_mod_bit_sizes": "60,40,40"}, "coeff_mod_bit_sizes", "list"),
    ],
)
def test_bad_parameters_name_the_field(config, field, words):
    with pytest.raises(HEConfigError) as err:
        CKKSParams.from_mapping(config)
    assert field in str(err.value) and words in str(err.value)
    assert str(err.value).startswith("he.config")


def test_params_survive_a_context_round_trip(tmp_path):
    params = CKKSParams(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40)
    site = HEContext.generate(params)
    site.save(tmp_path / "site.tenseal", with_secret_key=True)
    site.without_keys().save(tmp_path / "server.tenseal", with_secret_key=False)
    assert HEContext.load(tmp_path / "site.tenseal", require_secret_key=True).params == params
    assert HEContext.load(tmp_path / "server.tenseal", require_secret_key=False).params == params


def test_server_context_holds_no_key_and_secret_files_are_private(tmp_path, site_context):
    site_context.save(tmp_path / "site.tenseal", with_secret_key=True)
    site_context.without_keys().save(tmp_path / "server.tenseal", with_secret_key=False)
    assert (tmp_path / "site.tenseal").stat().st_mode & 0o777 == 0o600
    server = HEContext.load(tmp_path / "server.tenseal")
    assert not server.has_secret_key and not server.context.is_private()
    assert (tmp_path / "server.tenseal").stat().st_size < 1000  # parameters only; a secret key is ~160 KB
    with pytest.raises(HEKeyError, match="no secret key"):
        server.secret_key()
    with pytest.raises(HEKeyError, match="holds no secret key"):
        HEContext.load(tmp_path / "server.tenseal", require_secret_key=True)
    with pytest.raises(HEKeyError, match="holds a secret key"):
        HEContext.load(tmp_path / "site.tenseal", require_secret_key=False)


def test_unreadable_context_files_are_named(tmp_path):
    with pytest.raises(HEKeyError, match="missing.tenseal"):
        HEContext.load(tmp_path / "missing.tenseal")
    (tmp_path / "junk.tenseal").write_bytes(b"not a context")
    with pytest.raises(HEKeyError, match="junk.tenseal: not a TenSEAL context"):
        HEContext.load(tmp_path / "junk.tenseal")
