"""The benchmark code runs (small, on the CPU): every per-kernel step and the CLI."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

from moe_adapter_kernels import MoEAdapter

from helpers import ROOT, compiler_env, rel_err, small_config


@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_every_kernel_step_runs(kernels):
    pytest.importorskip("triton")
    if kernels == "cuda":
        from moe_adapter_kernels import cuda
        if not cuda.status()[0]:
            pytest.skip(cuda.status()[1])
    from benchmarks.kernels import steps
    torch.manual_seed(0)
    model = MoEAdapter(small_config(), backend="triton")
    x = torch.randn(40, 72)
    with torch.no_grad():
        table = steps(model, x, kernels)
        for name, fn, flops, nbytes in table:
            fn()
            assert nbytes > 0 and flops >= 0, name
    names = [t[0] for t in table]
    assert len(set(names)) == len(names)
    fns = {t[0].split(" [")[0]: t[1] for t in table}  # without the tuned path's label
    # the same op with the weights laid out anew, or on the split dact path
    probes = [n for n in names if "copy, n-fast" in n or "(split," in n]
    for probe in probes:
        got, want = fns[probe](), fns[probe.split(" (")[0]]()
        for g, w in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
            assert rel_err(g.reshape(w.shape), w) < 1e-5, probe
    assert len(probes) == (0 if kernels == "cuda" else 4)
    assert {"route", "permute", "expert_up", "expert_down", "combine", "shared_up",
            "shared_up cuBLAS+torch ops", "bwd shared_dact"} <= set(names)


def test_bench_cli_on_cpu(tmp_path, capsys):
    from benchmarks.bench import main
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["--tokens", "8", "16", "--modes", "fwd", "--skip-check", "--json", str(out),
                 "--markdown", str(tmp_path / "b.md"), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["device"].startswith("CPU") and len(res["results"]) == 4
    moe = [r for r in res["results"] if r["model"] == "moe-torch"]
    assert all(r["ratio"] > 0 for r in moe)
    captured = capsys.readouterr()
    assert "| 8 | fwd | moe-torch |" in captured.out and "| 16 | fwd | moe-torch |" in (
        tmp_path / "b.md").read_text()
    assert "[4/4] T=16 fwd moe-torch" in captured.err  # progress lines
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_verdicts_take_the_worst_row_each_target_applies_to():
    """The bench's verdict on the targets (printed and saved on GPU bf16 runs): the Triton
    backend's ratios to dense, the CUDA backend's times to Triton's; a target is met when
    its worst row is within the limit, and left out when the run has no row for it."""
    from benchmarks.bench import target_verdicts

    def row(model, T, mode, ms, ratio=None, mem=None):
        return {"model": model, "tokens": T, "mode": mode, "ms": ms, "ratio": ratio,
                "mem_ratio": mem}
    rows = [row("dense", 8192, "fwd", 2.0), row("moe-triton", 8192, "fwd", 1.6, 0.80),
            row("moe-cuda", 8192, "fwd", 3.0, 1.5), row("dense", 65536, "fwd", 16.0),
            row("moe-triton", 65536, "fwd", 14.0, 0.875), row("moe-cuda", 65536, "fwd", 29.0),
            row("moe-triton", 8192, "fwd+bwd", 7.0, 0.86, 0.7),
            row("moe-cuda", 8192, "fwd+bwd", 13.0), row("moe-triton", 512, "fwd+bwd", 1.0,
                                                        1.3, 0.75)]
    got = {v["target"]: v for v in target_verdicts(rows)}
    fwd = got["forward <= 0.85 x dense at T >= 8192"]
    assert not fwd["met"] and (fwd["worst"], fwd["tokens"]) == (0.875, 65536)
    assert got["forward+backward <= 0.90 x dense at T >= 8192"]["met"]
    mem = got["training peak memory <= 0.8 x dense"]
    assert mem["met"] and (mem["worst"], mem["tokens"]) == (0.75, 512)
    cuda = got["forward and forward+backward <= 2 x triton at T >= 8192"]
    assert not cuda["met"] and cuda["tokens"] == 65536 and abs(cuda["worst"] - 29 / 14) < 1e-12
    assert "forward <= 1.0 x dense at T = 2048" not in got  # no row at T = 2048
    assert all(v["model"] in ("moe-triton", "moe-cuda") for v in got.values())


def test_bench_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is optional: without it the run still succeeds and says why no plot."""
    import sys
    from benchmarks.bench import main
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    png = tmp_path / "b.png"
    assert main(["--tokens", "8", "--modes", "fwd", "--skip-check", "--json",
                 str(tmp_path / "b.json"), "--plot", str(png)]) == 0
    assert not png.exists() and "matplotlib is not installed" in capsys.readouterr().err


def test_tuning_records_picks_and_saves(tmp_path, monkeypatch):
    """tune_model visits every GEMM launch shape of a forward+backward, races the tile
    candidates (and cuBLAS for the dense launches, the split path for the routed dact), keeps
    the fastest (a fake timer here), and the table round-trips through its JSON file. A
    second tuning, with the split path in the table, records the same launches (the split
    dact's inner GEMM is not one of its own)."""
    pytest.importorskip("triton")
    from benchmarks.tune import tune_model
    from moe_adapter_kernels.ops import tuning

    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    tuning.table.cache_clear()
    torch.manual_seed(0)
    model = MoEAdapter(small_config(expert_activation="swiglu"), backend="triton")
    queued, timed = [], []
    candidates = tuning.candidates
    monkeypatch.setattr(tuning, "candidates", lambda key: queued.extend(candidates(key))
                        or candidates(key))

    def fake_timer(fn):  # runs the candidate, then prefers cuBLAS, split, BLOCK_N=64 BLOCK_K=32
        fn()
        cfg = queued.pop(0)
        timed.append(cfg)
        if cfg == tuning.CUBLAS:
            return 0.5
        if cfg.get("split"):
            return 0.7
        return 1.0 if (cfg["BLOCK_N"], cfg["BLOCK_K"]) == (64, 32) else 2.0

    gg = importlib.import_module("moe_adapter_kernels.ops.grouped_gemm")
    pick = gg.pick_config
    try:
        for again in (False, True):
            if again:  # the launchers follow the table just written, as on the GPU
                monkeypatch.setattr(gg, "pick_config", lambda key, a: {
                    n: v for n, v in tuning.table("fake-gpu").get(key, pick(key, a)).items()
                    if n != "ms"})
            timed.clear()
            n = tune_model(model, [40], "fake-gpu", fake_timer, log=lambda s: None)
            # up, down, shared up/down; dact expert/shared; expert dx; the experts' weight
            # gradients (the shared MLP's other backward GEMMs run in cuBLAS)
            assert n == 9 and not queued
            # cuBLAS: shared up, down, dact; split: the routed dact
            assert len(timed) == 9 * len(tuning.CANDIDATES) + 3 + len(tuning.SPLIT)
        path = tuning.save("fake-gpu")
        tuning.table.cache_clear()
        saved = tuning.table("fake-gpu")
        assert path.exists() and len(saved) == 9
        dense = {k: v for k, v in saved.items() if "|dense-" in k}
        assert len(dense) == 3 and all(v == dict(tuning.CUBLAS, ms=0.5) for v in dense.values())
        routed_dact = {k: v for k, v in saved.items() if k.startswith("dact|grouped-")}
        assert list(routed_dact.values()) == [dict(tuning.SPLIT[0], ms=0.7)]
        assert all((c["BLOCK_N"], c["BLOCK_K"]) == (64, 32) for k, c in saved.items()
                   if k not in dense and k not in routed_dact)
        assert "fwd|grouped-swiglu|float32|N24|K72|M256" in saved  # 40 tokens x 4 slots
        assert "wgrad|grouped-identity|float32|N40|K24|M256" in saved  # dW2 on g*act(pre)
    finally:
        tuning.table.cache_clear()


def test_a_device_without_a_table_reads_its_capability_stand_in(tmp_path, monkeypatch, capsys):
    """The launchers read a device's own tuned table, else the committed table of a device
    with the same compute capability (tuning.STAND_INS), else none (default tiles); the
    benchmark says which it read."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from benchmarks.bench import tile_table
    from moe_adapter_kernels.ops import tuning
    gg = importlib.import_module("moe_adapter_kernels.ops.grouped_gemm")
    devices = [("new-sm90", (9, 0)), ("own-gpu", (9, 0)), ("new-sm80", (8, 0))]
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(tuning, "STAND_INS", {(9, 0): "ref-gpu", (8, 0): "absent-gpu"})
    monkeypatch.setattr(tuning, "device_key", lambda index=0: devices[index][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: devices[index][1])
    monkeypatch.setattr(gg, "interpreting", lambda: False)
    key = "fwd|grouped-silu|bfloat16|N64|K64|M128"
    caches = (tuning.table, tuning.launch_table)
    for name, block_m in (("ref-gpu", 64), ("own-gpu", 32)):
        entry = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
        (tmp_path / f"{name}.json").write_text(json.dumps({key: dict(entry, ms=0.1)}))
    for cached in caches:
        cached.cache_clear()
    try:
        assert [tuning.launch_table(i) for i in range(3)] == ["ref-gpu", "own-gpu", "new-sm80"]
        picked = [gg.pick_config(key, SimpleNamespace(is_cuda=True, device=SimpleNamespace(
            index=i), dtype=torch.bfloat16))["BLOCK_M"] for i in range(3)]
        assert picked == [64, 32, gg.default_config(torch.bfloat16)["BLOCK_M"]]
        said = []
        assert tile_table(said.append) == "ref-gpu" and "stand-in" in said[0]
        monkeypatch.setattr(tuning, "device_key", lambda index=0: "new-sm80")
        monkeypatch.setattr(tuning, "launch_table", lambda index=0: "new-sm80")
        assert tile_table(said.append) is None and "default tiles" in said[1]
    finally:
        for cached in caches:
            cached.cache_clear()


def test_bench_graphs_needs_a_gpu(capsys):
    from benchmarks.bench import main
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; tests/test_gpu.py runs --graphs")
    assert main(["--graphs", "--skip-check"]) == 2
    assert "--graphs needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("launcher", [False, True])
def test_host_overhead_tool_counts_every_launch(launcher):
    """benchmarks.host runs in its own process (it needs the compiled-path launchers, not the
    interpreter's) and sees the 9 launches of one forward of the paper preset (shared MLP:
    norm, route, scan, permute, up, down, shared up and down, combine); with --launcher
    through Triton's own launch path (compiling each kernel for sm_90 once)."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.host", "--tokens", "64", "--iters",
                           "3"] + (["--launcher"] if launcher else []), capture_output=True,
                          text=True, env=compiler_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "9 Triton launches per forward" in proc.stdout
    assert ("run up to the driver" if launcher else "stubbed") in proc.stdout
    assert all(f"  {op} " in proc.stdout for op in ("route", "permute", "expert_up", "combine"))


def test_host_overhead_tool_times_a_training_step():
    """benchmarks.host --train: forward and backward of a training step, at reduced widths;
    the backward adds 10 launches to the forward's 9 (the input norm again for u, the output
    norm's backward, the shared and routed dact, the routed dx, input_grad, gate_grad,
    g * act(pre), the routed dW1 and dW2)."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.host", "--train", "--iters", "3"],
                          capture_output=True, text=True, env=compiler_env(), cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training step (widths reduced), T=64" in proc.stdout
    assert "19 Triton launches per step" in proc.stdout
    assert all(f"  {op} " in proc.stdout for op in ("input_grad", "weight_grad_op", "gate_grad"))


def test_memory_tracker_counts_new_storages_until_freed():
    """benchmarks.memory's tracker: the most bytes held at once by storages that ops inside
    created (512-byte rounded); views and in-place results of existing tensors are not new."""
    from benchmarks.memory import peak_tracker
    w = torch.zeros(1 << 20)
    with peak_tracker() as seen:
        a = torch.ones(1 << 18)  # 1 MiB
        b = torch.ones(1 << 19)  # 2 MiB
        w.add_(1.0)  # in place: not new
        v = w.t()[:10].view(-1)  # views: not new
        del a
        c = torch.empty(1 << 18) + 1.0  # 1 MiB, and 1 MiB more until the empty one goes
        assert seen["peak"] == 4 * 2**20
        d = torch.ones(3)  # 12 bytes -> 512
        e = torch.ones(1 << 18)
    assert seen["peak"] == 4 * 2**20 + 512
    assert c.sum() == (1 << 18) and b.numel() and v.numel() and d.numel() and e.numel()


def test_memory_estimate_tool_runs(tmp_path):
    """benchmarks.memory runs in its own process (Triton launches stubbed, no interpreter) and
    its estimates hold what must be alive at once. At T = 64 the weight gradients dominate:
    the MoE adapter hands them to autograd one at a time (its weight groups' own nodes), so
    its peak holds the largest (shared_w1 or w1: 50 MiB in bf16) but never two (any two: >= 80
    MiB; one node returning all four would hold 180); the dense adapter's larger layer hands
    over a 100 MiB gradient."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--tokens", "64"],
                          capture_output=True, text=True, env=compiler_env(), cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = {row.split("|")[2].strip(): float(row.split("|")[3]) for row in
             proc.stdout.splitlines() if row.startswith("| 64 |")}
    assert 50 <= peaks["moe"] < 80 and 100 <= peaks["dense"] < 200, proc.stdout


def test_memory_estimate_under_autocast():
    """Mixed precision (fp32 weights, bf16 compute): each weight group's bf16 gradient goes
    through its cast node into .grad before the next group's is computed, so the step's peak
    is the forward's (185 MiB at T = 64: autocast's bf16 weight copies, 180 MiB, and the
    activations). Measured alternatives: the group nodes all running before the cast nodes
    (weights cast before the nodes are made) 260 MiB, one node returning all four 364."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--tokens", "64",
                           "--models", "moe", "--autocast"], capture_output=True, text=True,
                          env=compiler_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp32 weights, autocast to bfloat16" in proc.stdout
    peak = next(float(row.split("|")[3]) for row in proc.stdout.splitlines()
                if row.startswith("| 64 | moe |"))
    assert 180 <= peak < 225, proc.stdout


def test_step_profile_on_cpu(tmp_path, capsys):
    """The step profiler runs without a GPU (CPU ops of the torch backend) and says so."""
    from benchmarks.step_profile import main
    out = tmp_path / "p.json"
    assert main(["--tokens", "8", "--steps", "1", "--top", "5", "--json", str(out)]) == 0
    prof = json.loads(out.read_text())["profiles"][0]
    assert prof["tokens"] == 8 and prof["total_ms"] > 0
    assert any("mm" in r["name"] for r in prof["rows"])  # the adapter's matmuls are listed
    captured = capsys.readouterr()
    assert "no GPU: profiling CPU ops" in captured.err and "| CPU op |" in captured.out


@pytest.mark.slow
def test_sass_profile_of_the_gemms(tmp_path):
    """benchmarks.sass builds every GEMM for sm_90 without a GPU and reads its loop: the
    Triton GEMMs on wgmma fed by async copies (and the split dact's epilogue pass, no GEMM,
    without spills), the CUDA GEMMs on ldmatrix + mma.sync with no generic (WMMA-style) or
    spilled loads in the loop."""
    pytest.importorskip("triton")
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sass", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=compiler_env(),
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = {r["kernel"]: r for r in json.loads(out.read_text())}
    triton = [r for k, r in rows.items() if k.startswith("triton") and "epilogue" not in k]
    assert len(triton) == 8
    for r in triton:
        assert r["HGMMA"] > 0 and r["LDGSTS"] + r["UTMALDG"] > 0, r
    assert rows["triton expert_dact split (epilogue pass)"]["STACK"] == 0
    cuda = [r for k, r in rows.items() if k.startswith("cuda")]
    if cuda:
        for r in cuda:
            assert r["HMMA"] > 0 and r["LDSM"] > 0 and r["LD_generic"] == 0 and r["LDL"] == 0, r


def test_precompile_fills_a_cache_the_next_process_finds(tmp_path):
    """benchmarks.precompile (own process: compiled-path launchers) builds an inference forward
    of the paper preset for sm_90 with the tiles the H100 table gives any sm_90 device (the
    shared up-projection at T = 512: 128x256), packs the cache for the device, and a second
    process finds every kernel in it (the keys are stable: what carrying the cache needs)."""
    pytest.importorskip("triton")
    cmd = [sys.executable, "-m", "benchmarks.precompile", "--out", str(tmp_path / "out"),
           "--cache", str(tmp_path / "cache"), "--presets", "paper", "--tokens", "512",
           "--modes", "infer"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=compiler_env(), cwd=ROOT,
                           timeout=600) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (proc.stdout for proc in runs)
    assert "9 kernels for sm_90 (9 compiled now" in first, first
    assert "9 kernels for sm_90 (0 compiled now" in second, second
    assert ("fwd|dense-silu|bfloat16|N10240|K2560|M512: BLOCK_M=128 BLOCK_N=256 BLOCK_K=64 "
            "num_warps=8 num_stages=4") in first
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["triton.tgz.00"]
