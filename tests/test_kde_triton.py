"""The Triton KDE kernel (collapselab.scores.kde_triton) against the float64 reference, on CPU.

Triton decides at decoration time whether a kernel runs compiled or in its interpreter, from
TRITON_INTERPRET in the environment; so the kernel runs in a child process started with
TRITON_INTERPRET=1, on CPU tensors, at tiny sizes. Inputs go to the child and scores come back
as .npy files. The bound is the one of tests/test_kernels.py (same folded float32 logits):
max |s − s_ref| ≤ 10 · eps · R² / v².
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from collapselab.scores import kde_attention as kernels
from collapselab.scores.kde_attention import kde_score, ou_scale_var

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAVE_TRITON, reason="triton is not installed (pip install 'collapselab[gpu]')"
)

D = 10
MEANS = torch.zeros(5, D, dtype=torch.float64)
MEANS[1:, :2] = torch.tensor([[4.0, 4.0], [4.0, -4.0], [-4.0, 4.0], [-4.0, -4.0]])
CASES = [(0.0, 0.1), (0.02, 0.1), (0.3, 0.1), (1.0, 0.6), (4.0, 0.6)]


def gmm_sample(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 5, (n,), generator=g)
    return MEANS[idx] + 0.6 * torch.randn(n, D, generator=g, dtype=torch.float64)


def noised(n: int, t: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(n, D, generator=g, dtype=torch.float64)
    return math.exp(-t / 2) * gmm_sample(n, seed) + math.sqrt(-math.expm1(-t)) * noise


def ref_score(y, c, a, v):
    """Direct float64 softmax of −‖y − a c‖²/(2v), the n×N matrix materialised."""
    logits = -((y[:, None, :] - a * c[None]) ** 2).sum(-1) / (2 * v)
    return (a * torch.softmax(logits, 1) @ c - y) / v


def tolerance(y, c, a, v) -> float:
    m = c.mean(0)
    r = max((y - a * m).norm(dim=1).max(), a * (c - m).norm(dim=1).max())
    return 10 * torch.finfo(torch.float32).eps * float(r) ** 2 / v**2


# Child process: each job is (name, y file, centres file, a, v, dtype, blocks, grad); it writes
# <name>.npy (the score) and, with grad, <name>.grad.npy (the vector-Jacobian product with g).
CHILD = r"""
import json, sys
import numpy as np, torch
from collapselab.scores import kde_triton
from collapselab.scores.kde_attention import kde_score
work = sys.argv[1]
for name, yf, cf, a, v, dtype, blocks, grad in json.load(open(f"{work}/jobs.json")):
    y = torch.from_numpy(np.load(f"{work}/{yf}")).to(getattr(torch, dtype))
    c = torch.from_numpy(np.load(f"{work}/{cf}")).to(getattr(torch, dtype))
    if blocks:
        q = torch.from_numpy(np.load(f"{work}/{yf}"))
        keys = kde_triton.kde_attention(q.float(), c.float(), 1.0 / v, blocks=tuple(blocks))
        np.save(f"{work}/{name}.npy", keys.double().numpy())
        continue
    y.requires_grad_(grad)
    s = kde_score(y, c, a, v, backend="triton")
    np.save(f"{work}/{name}.npy", s.detach().double().numpy())
    if grad:
        g = torch.from_numpy(np.load(f"{work}/g.npy")).to(y.dtype)
        (gy,) = torch.autograd.grad(s, y, g)
        np.save(f"{work}/{name}.grad.npy", gy.double().numpy())
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """Runs every job in one interpreted child process; returns name -> array."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (pip install 'collapselab[gpu]')")
    work = tmp_path_factory.mktemp("triton")
    centres = gmm_sample(1000, seed=0)
    np.save(work / "c.npy", centres.numpy())
    jobs, inputs = [], {}
    for t, h in CASES:
        a, v = ou_scale_var(t, h)
        y = noised(200, t, seed=1)
        np.save(work / f"y{t}.npy", y.numpy())
        jobs.append((f"s{t}_{h}", f"y{t}.npy", "c.npy", a, v, "float32", None, False))
        inputs[f"s{t}_{h}"] = (y, centres, a, v)
    # Half input: computed in float32, returned in float16.
    a, v = ou_scale_var(1.0, 0.6)
    jobs.append(("half", "y1.0.npy", "c.npy", a, v, "float16", None, False))
    # Far queries at v = 1e-4: logits ~ 1e7, one centre dominates (overflow check).
    far = torch.tensor([[60.0] * D, [-45.0] + [0.0] * (D - 1)], dtype=torch.float64)
    np.save(work / "far.npy", far.numpy())
    jobs.append(("far", "far.npy", "c.npy", 1.0, 1e-4, "float32", None, False))
    # Gradient in y: the triton forward and the streamed backward, against float64 autograd.
    a, v = ou_scale_var(0.02, 0.6)
    yg = noised(60, 0.02, seed=9)
    np.save(work / "yg.npy", yg.numpy())
    g = torch.randn(60, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.save(work / "g.npy", g.numpy())
    jobs.append(("grad", "yg.npy", "c.npy", a, v, "float32", None, True))
    # Raw attention with small tiles: ragged edges on both axes, and a single centre.
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(37, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(101, 16, generator=gen, dtype=torch.float64)
    np.save(work / "q.npy", q.numpy())
    np.save(work / "k.npy", k.numpy())
    np.save(work / "k1.npy", k[:1].numpy())
    jobs.append(("edges", "q.npy", "k.npy", 1.0, 0.7, "float32", [16, 32], False))
    jobs.append(("one", "q.npy", "k1.npy", 1.0, 0.7, "float32", [16, 16], False))
    import json

    (work / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(work)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {p.name[:-4]: np.load(p) for p in work.glob("*.npy")}
    return dict(out=out, inputs=inputs, far=far, yg=yg, g=g, q=q, k=k, centres=centres)


@needs_triton
@pytest.mark.parametrize("t,h", CASES)
def test_triton_score_matches_float64_reference(child, t, h):
    y, c, a, v = child["inputs"][f"s{t}_{h}"]
    out = torch.from_numpy(child["out"][f"s{t}_{h}"])
    assert out.shape == y.shape
    err = (out - ref_score(y, c, a, v)).abs().max().item()
    assert err <= tolerance(y, c, a, v), err


@needs_triton
def test_triton_half_input_and_far_queries(child):
    y, c, a, v = child["inputs"]["s1.0_0.6"]
    half = torch.from_numpy(child["out"]["half"])
    ref = ref_score(y.half().double(), c.half().double(), a, v)
    # float16 output rounding (2^-11 relative) on top of the float32 bound.
    assert (half - ref).abs().max().item() <= tolerance(y, c, a, v) + 2**-10 * ref.abs().max()
    far, centres = child["far"], child["centres"]
    ref = ref_score(far, centres, 1.0, 1e-4)
    out = torch.from_numpy(child["out"]["far"])
    assert torch.isfinite(out).all()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-6


@needs_triton
def test_triton_gradient_in_y(child):
    a, v = ou_scale_var(0.02, 0.6)
    y = child["yg"].clone().requires_grad_()
    (ref,) = torch.autograd.grad(ref_score(y, child["centres"], a, v), y, child["g"])
    out = torch.from_numpy(child["out"]["grad.grad"])
    assert (out - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@needs_triton
def test_triton_tiles_with_ragged_edges(child):
    """Raw attention Σ softmax(q·k/v) k with 16×32 and 16×16 tiles over 37 × 101 and 37 × 1."""
    q, k = child["q"], child["k"]
    for name, keys in (("edges", k), ("one", k[:1])):
        ref = torch.softmax(q @ keys.T / 0.7, 1) @ keys
        out = torch.from_numpy(child["out"][name])
        assert out.shape == (37, 16)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_auto_selects_triton_only_on_cuda(monkeypatch):
    fake = SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cuda"))
    monkeypatch.setattr(kernels, "_triton_runs", lambda y: True)
    assert kernels._resolve_backend("auto", fake) == "triton"
    assert kernels._resolve_backend("auto", torch.zeros(2, 2)) == "sdpa"  # CPU stays on sdpa
    monkeypatch.setattr(kernels, "_triton_runs", lambda y: False)
    assert kernels._resolve_backend("auto", fake) == "sdpa"


def test_triton_never_takes_float64_or_plain_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels._triton_runs(torch.zeros(2, 2, dtype=torch.float64))
    assert not kernels._triton_runs(torch.zeros(2, 2))  # CPU tensor, no interpreter


def test_explicit_triton_falls_back_to_sdpa_with_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_runs", lambda y: False)
    a, v = ou_scale_var(0.5, 0.6)
    y, c = noised(20, 0.5, seed=7).float(), gmm_sample(100, seed=0).float()
    with pytest.warns(RuntimeWarning, match="sdpa"):
        out = kde_score(y, c, a, v, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(out, kde_score(y, c, a, v, backend="sdpa"), rtol=0, atol=0)
