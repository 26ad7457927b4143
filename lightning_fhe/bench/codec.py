"""What encrypting one model update costs: the Clara Train / NVFlare way against ours, in one run.

The baseline is how Clara Train 4.0 and NVFlare encrypt: one TenSEAL ``ckks_vector`` per state-dict tensor under a
public-key context (N=8192, primes [60, 40, 40], scale 2^40), each serialized with ``serialize()``. Ours packs the
same tensors with :class:`~lightning_fhe.he.codec.UpdateCipher`. Both see the same tensors, on the same machine,
in the same process, so the ratios hold even where absolute times are noisy.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import numpy as np
import tenseal as ts
import torch

from lightning_fhe.he import CKKSParams, HEContext
from lightning_fhe.he.codec import CiphertextSum, UpdateCipher
from lightning_fhe.he.fixed_point import round_to_grid
from lightning_fhe.he.layout import TensorLayout
from lightning_fhe.models import build_model

# The acceptance targets, printed beside the measurements.
TARGETS = {
    "upload_vs_raw": 2.05,
    "download_vs_raw": 4.05,
    "encrypt_speedup": 5.0,
    "decrypt_speedup": 2.0,
    "max_abs_error": 1e-6,
}


@contextlib.contextmanager
def _stdout_silenced():
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _baseline(params: CKKSParams, state: dict[str, torch.Tensor]) -> dict[str, float]:
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    context.global_scale = params.scale
    arrays = [t.detach().double().reshape(-1).numpy() for t in state.values()]
    with _stdout_silenced():  # TenSEAL's C++ warns on stdout for every vector longer than one ciphertext
        start = time.perf_counter()
        blobs = [ts.ckks_vector(context, a).serialize() for a in arrays]
        encrypt_s = time.perf_counter() - start
    start = time.perf_counter()
    for blob, tensor in zip(blobs, state.values()):
        torch.tensor(ts.ckks_vector_from(context, blob).decrypt()).reshape(tensor.shape)
    decrypt_s = time.perf_counter() - start
    return {"upload_bytes": sum(map(len, blobs)), "encrypt_s": encrypt_s, "decrypt_s": decrypt_s}


def run(model: str = "segresnet-16", clients: int = 2, seed: int = 0, log=print) -> dict[str, Any]:
    """Measures both codecs on ``model`` with ``clients`` sites' updates and returns the JSON record."""
    if clients < 1:
        raise ValueError(f"--clients must be at least 1, got {clients}")
    params = CKKSParams()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    state = {k: v for k, v in build_model(model).state_dict().items() if v.is_floating_point()}
    layout = TensorLayout.from_tensors(state)
    raw_bytes = sum(t.numel() * t.element_size() for t in state.values())
    log(f"{model}: {layout.numel:,} parameters in {len(state)} tensors, {raw_bytes / 1e6:.1f} MB fp32")

    log("baseline: one ckks_vector per tensor ...")
    baseline = _baseline(params, state)

    site = HEContext.generate(params)
    cipher, server = UpdateCipher(site), site.without_keys()
    total = CiphertextSum(server, 0)
    weights = rng.integers(1, 1000, size=clients).astype(np.float64)
    shares = weights / weights.sum()
    exact, on_grid = np.zeros(layout.numel), np.zeros(layout.numel)  # the true average; what plaintext FedAvg sums
    encrypt_s, aggregate_s, upload_bytes = [], [], []
    for k in range(clients):
        log(f"lightning_fhe: site {k + 1}/{clients} encrypts ...")
        update = {n: t + 0.01 * torch.randn_like(t) for n, t in state.items()}
        start = time.perf_counter()
        chunks = cipher.encrypt(layout.flatten(update), shares[k], where=layout.locate)
        encrypt_s.append(time.perf_counter() - start)
        upload_bytes.append(sum(map(len, chunks)))
        exact += shares[k] * layout.flatten(update)
        on_grid += round_to_grid(shares[k] * layout.flatten(update), params.grid_bits)
        if k == 0:
            total = CiphertextSum(server, len(chunks))
        start = time.perf_counter()
        for i, chunk in enumerate(chunks):
            total.add(i, chunk)
        aggregate_s.append(time.perf_counter() - start)
    global_chunks = total.chunks()
    start = time.perf_counter()
    average = cipher.decrypt(global_chunks, layout.numel, float(shares.sum()))
    layout.unflatten(average)
    decrypt_s = time.perf_counter() - start

    return {
        "model": model,
        "params": layout.numel,
        "raw_bytes": raw_bytes,
        "clients": clients,
        "baseline": baseline,
        "lightning_fhe": {
            "upload_bytes": int(np.mean(upload_bytes)),
            "download_bytes": sum(map(len, global_chunks)),
            "encrypt_s": float(np.mean(encrypt_s)),
            "decrypt_s": decrypt_s,
            "aggregate_s_per_client": float(np.mean(aggregate_s)),
            "max_abs_error": float(np.max(np.abs(average - exact))),
            "equals_plaintext_average": bool(np.array_equal(average, on_grid / float(shares.sum()))),
        },
    }


def format_table(result: dict[str, Any]) -> str:
    raw, base, ours = result["raw_bytes"], result["baseline"], result["lightning_fhe"]
    mb = 1e6
    rows = [
        "| codec | upload MB | upload vs fp32 | download MB | download vs fp32 | encrypt s | decrypt s |",
        "|---|---|---|---|---|---|---|",
        f"| fp32 (no HE) | {raw / mb:.1f} | 1.00x | {raw / mb:.1f} | 1.00x | - | - |",
        f"| ckks_vector per tensor (Clara/NVFlare) | {base['upload_bytes'] / mb:.1f} | {base['upload_bytes'] / raw:.2f}x "
        f"| {base['upload_bytes'] / mb:.1f} | {base['upload_bytes'] / raw:.2f}x | {base['encrypt_s']:.2f} | {base['decrypt_s']:.2f} |",
        f"| lightning_fhe | {ours['upload_bytes'] / mb:.1f} | {ours['upload_bytes'] / raw:.2f}x "
        f"| {ours['download_bytes'] / mb:.1f} | {ours['download_bytes'] / raw:.2f}x | {ours['encrypt_s']:.2f} | {ours['decrypt_s']:.2f} |",
    ]
    checks = [
        ("upload vs fp32", ours["upload_bytes"] / raw, "<=", TARGETS["upload_vs_raw"]),
        ("download vs fp32", ours["download_bytes"] / raw, "<=", TARGETS["download_vs_raw"]),
        ("encrypt speed-up vs baseline", base["encrypt_s"] / ours["encrypt_s"], ">=", TARGETS["encrypt_speedup"]),
        ("decrypt speed-up vs baseline", base["decrypt_s"] / ours["decrypt_s"], ">=", TARGETS["decrypt_speedup"]),
        ("max abs error of the average", ours["max_abs_error"], "<=", TARGETS["max_abs_error"]),
    ]
    lines = [
        f"{result['model']}: {result['params']:,} parameters, {raw / mb:.1f} MB fp32, {result['clients']} sites",
        "",
        *rows,
        "",
        f"server aggregation: {ours['aggregate_s_per_client']:.2f} s per site update (keyless)",
    ]
    for name, value, op, target in checks:
        ok = value <= target if op == "<=" else value >= target
        lines.append(f"{name:<30} {value:10.3g}   target {op} {target:g}   {'ok' if ok else 'MISSED'}")
    same = ours["equals_plaintext_average"]
    verdict = "ok" if same else "MISSED"
    lines.append(f"{'same bits as plaintext FedAvg':<30} {'yes' if same else 'no':>10}   target yes   {verdict}")
    return "\n".join(lines)
