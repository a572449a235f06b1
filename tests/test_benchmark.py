"""The benchmark harness runs and writes its files; the saved-memory claims hold.

No timing is asserted here: speed is shown by `make bench`, not by tests.
"""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_layers  # noqa: E402


def test_harness_prints_table_and_writes_json_and_png(tmp_path, capsys):
    bench_layers.main(["--shapes", "tiny", "--rounds", "1", "--min-time", "0.001", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| tiny | 10,10,40 | float32 | relu | fwd+bwd |" in printed
    assert "handgrad/eager" in printed
    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert len(data["results"]) == 3 * 2  # three activations, two modes
    assert all(r["handgrad"] > 0 and r["floor"] > 0 and r["node"] > 0 for r in data["results"])
    assert all(r["bound"] >= r["node"] for r in data["results"])
    assert "bound/eager" in printed
    assert (tmp_path / "bench_cpu.png").stat().st_size > 1000


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid"])
def test_saved_memory_is_at_most_eagers(activation):
    rows, (batch, width, layers) = bench_layers.memory_table([activation], width=64, batch=128, layers=8)
    (row,) = rows
    assert row["handgrad_bytes_per_layer"] <= row["eager_bytes_per_layer"]
    activations = batch * width * 4
    if activation == "leaky_relu":
        # Eager keeps each layer's pre-activation as well as its output (the next layer's
        # input); we keep the output alone, which costs one extra output for the last layer.
        saved_per_layer = row["eager_bytes_per_layer"] - row["handgrad_bytes_per_layer"]
        assert saved_per_layer >= (layers - 1) / layers * activations


def test_the_bound_is_the_compute_free_node_plus_the_flops_at_the_fma_limit():
    row = {"NKM": (10, 10, 40), "mode": "fwd+bwd", "node": 2e-5}
    assert bench_layers.bound(row, 100.0) == pytest.approx(2e-5 + 3 * 2 * 10 * 10 * 40 / 100e9)
    assert bench_layers.bound({**row, "mode": "fwd"}, 100.0) == pytest.approx(2e-5 + 2 * 10 * 10 * 40 / 100e9)
    assert bench_layers.bound(row, None) == 2e-5  # no compiler to measure the limit: the node alone
    import bench_networks

    # 10-40-40-5 at 10 rows: 2 * 10 * (400 + 1600 + 200) per pass; no dl/dx of the input.
    assert bench_networks.flops([10, 40, 40, 5], 10, "inference") == 44_000
    assert bench_networks.flops([10, 40, 40, 5], 10, "fwd+bwd") == 3 * 44_000 - 8_000
    network = {"sizes": [10, 40, 40, 5], "rows": 10, "node fwd+bwd": 1e-5}
    assert bench_networks.bound(network, "fwd+bwd", 50.0) == pytest.approx(1e-5 + 124_000 / 50e9)


def test_the_network_that_computes_nothing_has_the_networks_parameters_and_loss():
    import bench_networks

    reference = torch.nn.Sequential(torch.nn.Linear(10, 40), torch.nn.ReLU(), torch.nn.Linear(40, 5))
    steps, parameters = bench_networks.node_steps(reference, torch.randn(7, 10), torch.randn(7, 5))
    assert set(steps) == {"node step", "node fwd+bwd", "node inference"}
    for step in steps.values():
        step()
    assert len(parameters) == 4 and all(p.numel() == 1 and p.grad is not None for p in parameters)


def test_network_harness_prints_its_tables_and_writes_json(tmp_path, capsys):
    import bench_networks

    rows = bench_networks.main(["--networks", "fig7.8 batch 10", "--rounds", "1", "--min-time", "0.001",
                                "--out", str(tmp_path), "--real-models", "no", "--compile", "no"])
    printed = capsys.readouterr().out
    assert "| fig7.8 batch 10 | 10-40-40-5 | 10 |" in printed
    assert "FMA limit" in printed and "BLAS sgemm" in printed and "Inside the MLP op" in printed
    assert "| fig7.8 batch 10 | fwd+bwd |" in printed and "bound/torch.nn" in printed
    (row,) = rows
    ran = [c for c in bench_networks.CANDIDATES if c != "compile(torch.nn)"]
    assert all(row[f"{c} {mode}"] > 0 for c in ran + ["node"] for mode in bench_networks.MODES)
    assert "compile(torch.nn) step" not in row
    assert row["op"]["forward"] > 0 and row["op"]["backward"] > 0
    assert json.loads((tmp_path / "bench_networks.json").read_text())["results"][0]["rows"] == 10


def test_network_harness_times_other_activations_without_relus_targets(tmp_path, capsys):
    import bench_networks

    bench_networks.main(["--networks", "wide512 batch 256", "--activation", "silu", "--rounds", "1",
                         "--min-time", "0.001", "--out", str(tmp_path), "--real-models", "no", "--compile", "no"])
    printed = capsys.readouterr().out
    assert "# Whole networks, silu" in printed and "| wide512 batch 256 | 512-512-512-512-10 | 256 |" in printed
    assert "| wide512 batch 256 | fwd+bwd |" in printed and printed.count("| - |") >= len(bench_networks.MODES)
    saved = json.loads((tmp_path / "bench_networks_silu.json").read_text())
    assert saved["activation"] == "silu" and saved["results"][0]["rows"] == 256


def test_real_models_of_the_network_harness_are_fused_and_timed():
    import bench_layers
    import bench_networks

    names = ["NeRF-sized, 4096 rows", "actor-critic (pytorch/examples), 1 state", "DeepSDF decoder 512x4, 2048 points"]
    rows = {r["model"]: r for r in bench_networks.real_models(1, 0.001, bench_layers.measure, names)}
    nerf, actor_critic, deepsdf = (rows[name] for name in names)
    assert nerf["fused"] > 0 and actor_critic["unfused"] > 0
    # The bound's FLOPs: NeRF's products (63-256, six 256-256, 319-256 after the skip, 256-4)
    # on 4096 rows: forward, dl/dOmega, and dl/dh for all but the input.
    forward = 63 * 256 + 6 * 256 * 256 + 319 * 256 + 256 * 4
    assert nerf["flops"] == 2 * 4096 * (3 * forward - 63 * 256)
    # every hidden layer, the one shared layer, and the weight-normed layers behind a branch with the tanh output layer
    assert (nerf["fused layers"], actor_critic["fused layers"], deepsdf["fused layers"]) == (8, 1, 5)


def test_second_order_harness_checks_gradients_prints_its_table_and_writes_json(tmp_path, capsys):
    import bench_second_order

    (row,) = bench_second_order.main(["--workloads", "deepxde", "--rounds", "1", "--min-time", "0.001",
                                      "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| DeepXDE 2-20-20-20-1 tanh, 4096 points |" in printed and "FMA limit" in printed
    assert row["float64 agreement"] < 1e-12  # every candidate's parameter gradients are torch.nn's
    assert all(row[c] > 0 for c in bench_second_order.CANDIDATES)
    assert json.loads((tmp_path / "second_order.json").read_text())["rows"][0]["workload"] == row["workload"]


def test_call_overhead_times_the_same_gradients_both_ways():
    """bench_call_overhead.py compares eager and handgrad on the same work: in every setting
    the two layers give the same gradients, and the table has a row per layer and setting."""
    import bench_call_overhead

    made = bench_call_overhead.steps(*bench_call_overhead.SHAPES["actor-critic layer"])
    for setting in bench_call_overhead.SETTINGS:
        eager, ours = made[("eager", setting)](), made[("handgrad", setting)]()
        for e, o in zip(eager, ours, strict=True):
            torch.testing.assert_close(o, e)
    rows = bench_call_overhead.main(["--rounds", "1", "--min-time", "0.001"])
    assert len(rows) == len(bench_call_overhead.SHAPES) * len(bench_call_overhead.SETTINGS)
    assert all(row["eager"] > 0 and row["handgrad"] > 0 for row in rows)


def test_the_fma_limit_is_measured_once_per_capability():
    """A table's header and its later columns read one measurement of the FMA limit: the same
    capability, named or by default, is not probed again after the timings."""
    import machine

    machine._measured_fma_limit.cache_clear()
    first = machine.fma_limit(1, machine.running_capability())
    assert machine.fma_limit(1) == first
    assert machine._measured_fma_limit.cache_info().misses == 1
