"""The fused CPU engine behind torch.ops.handgrad.mlp and the fused layers: blocks of rows
through every layer, handgrad's own products, weight gradients summed in a fixed order.

Its sums run in another order than eager's BLAS, so the tests hold it to a float64 truth
(no farther from it than eager), to itself (the same bits on every run and thread count),
and to the torch.nn twin for bias=False and output_activation. The engine's tests run with
the kernels of every CPU capability the machine offers (the cpu_capability fixture)."""

import pytest
import torch
from samples import (
    DTYPES,
    NETWORK_ACTIVATIONS,
    NETWORK_SLOPES,
    assert_as_accurate_as_eager,
    eager_network,
    gradients,
    leaves,
    same_bits_for_every_thread_count,
    tolerances,
    twin,
)
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import handgrad
import handgrad.functional as hf
import handgrad.nn as hnn

ops = torch.ops.handgrad


def random_network(sizes, rows, dtype, bias=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, sizes[0], generator=g)
    weights = [torch.randn(o, i, generator=g) * (scale / max(i, 1) ** 0.5) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [torch.randn(o, generator=g) for o in sizes[1:]] if bias else []
    grad_output = torch.randn(rows, sizes[-1], generator=g)
    return x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases], grad_output.to(dtype)


# thin and multi-block (several slots), wide, odd widths, widths 1 and 129, and no rows.
SHAPES = {
    "thin": ([64, 64, 64, 64, 16], 700),
    "wide": ([5, 700, 3], 40),
    "odd": ([7, 1, 13, 2], 37),
    "widths": ([1, 16, 100, 129, 1], 65),
    "empty": ([6, 9, 4], 0),
    "one_layer": ([33, 17], 301),
}


@pytest.mark.parametrize("activation,slope", NETWORK_SLOPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.usefixtures("cpu_capability")
def test_as_close_to_float64_as_eager(shape, dtype, activation, slope):
    sizes, rows = SHAPES[shape]
    x, weights, biases, grad_output = random_network(sizes, rows, dtype)
    truth_args = leaves([x.double(), *[w.double() for w in weights], *[b.double() for b in biases]])
    ours_args, eager_args = leaves([x, *weights, *biases]), leaves([x, *weights, *biases])
    n = len(weights)

    def run(args):
        return args[0], args[1:n + 1], args[n + 1:]

    out = hf.mlp(*run(ours_args), activation, slope)
    expected = eager_network(*run(eager_args), activation, slope)
    truth = eager_network(*run(truth_args), activation, slope, stored_as=dtype)
    assert out.dtype == dtype
    assert_as_accurate_as_eager(out, expected, truth, factor=2)
    for got, want, true in zip(torch.autograd.grad(out, ours_args, grad_output),
                               torch.autograd.grad(expected, eager_args, grad_output),
                               torch.autograd.grad(truth, truth_args, grad_output.double())):
        assert_as_accurate_as_eager(got, want, true, factor=2)


@pytest.mark.parametrize("every", [0, 2])
@pytest.mark.parametrize("output_activation", [None, "sigmoid", "leaky_relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.usefixtures("cpu_capability")
def test_bias_and_output_activation_match_the_eager_network(bias, output_activation, every):
    x, weights, biases, grad_output = random_network([12, 40, 30, 20, 6], 300, torch.float64, bias=bias)
    ours_args, eager_args = leaves([x, *weights, *biases]), leaves([x, *weights, *biases])
    n = len(weights)
    out = ops.mlp(ours_args[0], ours_args[1:n + 1], ours_args[n + 1:], "leaky_relu", -0.1, every,
                  output_activation)
    expected = eager_network(eager_args[0], eager_args[1:n + 1], eager_args[n + 1:], "leaky_relu",
                             -0.1, output_activation)
    torch.testing.assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out, ours_args, grad_output),
                         torch.autograd.grad(expected, eager_args, grad_output)):
        torch.testing.assert_close(got, want)


def goes_to_blas(weights, rows, activation="relu", slope=0.0, every=0, output_activation=None, backward=False):
    return handgrad._C.cpu_products_go_to_blas(rows, weights, activation, slope, every, output_activation, True,
                                               backward=backward)


def forward_path(weights, rows, activation="relu", slope=0.0, every=0, output_activation=None):
    return handgrad._C.cpu_forward_path(rows, weights, activation, slope, every, output_activation, True)


# (sizes, rows, the forward's path, the backward goes to BLAS) on AVX2 and AVX512. Where the
# rows are few for the weights (at most 64, weights at most 512 x 512 on average), the
# backward stays in the engine, which packs nothing for it, and the forward too from 16 rows,
# as f^T = Omega h^T ("transposed").
@pytest.mark.parametrize("sizes,rows,path,backward", [
    ([784, 256, 256, 10], 64, "transposed", False), ([512, 512], 256, "blas", True),
    ([1024, 1024], 4096, "blas", True),  # deep products
    ([784, 256, 256, 10], 16, "transposed", False), ([256, 256], 512, "blas", True),  # few rows for wide weights
    ([784, 256, 256, 10], 8, "blas", False),  # too few rows for the transposed pass's vectors
    ([784, 256, 256, 10], 65, "blas", True), ([1024, 1024, 10], 64, "blas", True),  # past the backward's bounds
    ([40, 40, 40], 4096, "blas", True),  # too shallow for the streaming regime
    ([64, 64, 64, 64, 16], 3000, "blocks", False), ([63, 256, 256, 4], 4096, "blocks", False),
    ([256, 256], 16384, "blocks", False),
    ([64, 64], 1024, "blas", True), ([64, 64], 512, "blas", True),  # fewer blocks than to keep threads busy
    ([256, 1], 64, "blas", False), ([64, 8], 64, "blas", False),  # a single layer of few outputs: mostly masked vectors
    ([2048, 100, 10], 64, "transposed", False), ([100, 2048, 10], 16, "transposed", False),
    ([784, 256], 64, "blas", False),  # a single layer: packing x^T and writing f back eat the gain
    ([10, 40, 40, 5], 100, "blocks", False), ([64, 64], 256, "blocks", False),
    ([10, 40, 40, 5], 16, "blocks", False),  # small weights
])
def test_products_go_to_blas_where_fusion_saves_nothing(cpu_capability, sizes, rows, path, backward):
    x, weights, biases, grad_output = random_network(sizes, rows, torch.float32)
    # DEFAULT's tiles are scalar code: there the engine keeps small weights and fewer than 32
    # rows, has no transposed pass (no brgemm), and the backward goes where the forward does.
    default = cpu_capability == "DEFAULT"
    if default:
        path = "blas" if path == "transposed" or rows >= 32 else path
    assert forward_path(weights, rows) == path
    assert goes_to_blas(weights, rows) == (path == "blas")
    assert goes_to_blas(weights, rows, backward=True) == (path == "blas" if default else backward)
    if path == "transposed":  # float32's only: brgemm's
        assert forward_path([w.double() for w in weights], rows) == "blas"
    assert not goes_to_blas(weights, rows, every=1)  # checkpointing recomputes in the engine
    assert not goes_to_blas(weights, rows, every=1, backward=True)
    if len(weights) > 1:  # only the engine's backward recomputes f where the output hides its sign
        assert forward_path(weights, rows, "leaky_relu", -0.5) == path
        assert not goes_to_blas(weights, rows, "leaky_relu", -0.5, backward=True)
    # Either way, eager's results, and the float64 truth's within eager's error.
    truth_args = leaves([x.double(), *[w.double() for w in weights], *[b.double() for b in biases]])
    ours_args, eager_args = leaves([x, *weights, *biases]), leaves([x, *weights, *biases])
    n = len(weights)
    out = hf.mlp(ours_args[0], ours_args[1:n + 1], ours_args[n + 1:], "relu")
    expected_out = eager_network(eager_args[0], eager_args[1:n + 1], eager_args[n + 1:], "relu", 0.0)
    truth = eager_network(truth_args[0], truth_args[1:n + 1], truth_args[n + 1:], "relu", 0.0)
    assert_as_accurate_as_eager(out, expected_out, truth, factor=2)
    for got, want, true in zip(torch.autograd.grad(out, ours_args, grad_output),
                               torch.autograd.grad(expected_out, eager_args, grad_output),
                               torch.autograd.grad(truth, truth_args, grad_output.double())):
        assert_as_accurate_as_eager(got, want, true, factor=2)


# (sizes, rows, recorded as a chain of layers on AVX2 and AVX512) for hidden activations
# whose a' is read off f: the chain, each layer keeping its f, wherever the engine's
# backward, recomputing every f, would lose; the engine keeps small weights at few rows and
# products narrower than 192 streamed over many rows. A single layer is a layer already.
@pytest.mark.parametrize("sizes,rows,layers", [
    ([784, 256, 256, 10], 64, True), ([784, 256, 256, 10], 8, True), ([1024, 1024, 10], 64, True),
    ([512, 512, 512, 10], 256, True), ([40, 40, 40], 4096, True), ([2048, 100, 10], 64, True),
    ([63, 256, 256, 4], 4096, True),  # mean depth 218: the engine's recomputation loses
    ([64, 64, 64, 64, 16], 3000, False), ([3, 128, 128, 128, 1], 8192, False),  # streamed, narrow
    ([10, 40, 40, 5], 100, False), ([10, 40, 40, 5], 16, False),  # small weights
    ([512, 512], 256, False), ([784, 256], 64, False),  # a single layer
])
@pytest.mark.parametrize("activation,parameters", [("silu", {}), ("gelu", {}), ("softplus", {"beta": 2.0}),
                                                   ("leaky_relu", {"negative_slope": -0.5})], ids=str)
def test_networks_whose_a_prime_reads_f_are_recorded_as_layers_where_the_engine_would_lose(
        cpu_capability, sizes, rows, layers, activation, parameters):
    x, weights, biases, grad_output = random_network(sizes, rows, torch.float32)
    if cpu_capability == "DEFAULT":  # no streaming regime; small weights below 32 rows only
        layers = len(weights) > 1 and not (rows < 32 and max(sizes) <= 64)
    runs_as_layers = handgrad._C.cpu_network_runs_as_layers
    assert runs_as_layers(rows, weights, activation, **parameters) == layers
    assert not runs_as_layers(rows, weights, activation, checkpoint_every=1, **parameters)
    assert not runs_as_layers(rows, weights, "relu") and not runs_as_layers(rows, weights, "tanh")
    args = leaves([x, *weights, *biases])
    n = len(weights)
    out = hf.mlp(args[0], args[1:n + 1], args[n + 1:], activation, **parameters)
    nodes, todo = set(), [out.grad_fn]
    while todo:  # the graph's node types
        node = todo.pop()
        nodes.add(node.name())
        todo += [next_node for next_node, _ in node.next_functions if next_node is not None]
    assert ("LinearActivationBackward0" in nodes) == layers and ("MLPBackward0" in nodes) != layers
    with torch.no_grad():  # nothing recorded: the one op
        torch.testing.assert_close(hf.mlp(x, weights, biases, activation, **parameters), out.detach())


def test_a_network_recorded_as_layers_keeps_eagers_tensors_and_gives_eagers_gradients(cpu_capability):
    # 256 rows of 512-wide layers: the chain. Each layer keeps h and f, as eager's Linear and
    # SiLU do; within eager's error of the float64 truth, first and second order.
    sizes, rows = [512, 512, 512, 10], 256
    x, weights, biases, grad_output = random_network(sizes, rows, torch.float32)
    n = len(weights)
    ours, eager, truth = leaves([x, *weights, *biases]), leaves([x, *weights, *biases]), \
        leaves([x.double(), *[w.double() for w in weights], *[b.double() for b in biases]])
    def kept_bytes(run):  # distinct storage kept, the input and parameters excluded
        kept, leaf_storage = {}, {t.untyped_storage().data_ptr() for t in ours + eager}

        def keep(t):
            if t.untyped_storage().data_ptr() not in leaf_storage:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            return run(), sum(kept.values())
    out, ours_kept = kept_bytes(lambda: hf.mlp(ours[0], ours[1:n + 1], ours[n + 1:], "silu"))
    expected, eager_kept = kept_bytes(lambda: eager_network(eager[0], eager[1:n + 1], eager[n + 1:], "silu", 0.0))
    assert ours_kept == eager_kept
    true_out = eager_network(truth[0], truth[1:n + 1], truth[n + 1:], "silu", 0.0)
    assert_as_accurate_as_eager(out, expected, true_out, factor=2)
    for got, want, true in zip(torch.autograd.grad(out, ours, grad_output, create_graph=True),
                               torch.autograd.grad(expected, eager, grad_output, create_graph=True),
                               torch.autograd.grad(true_out, truth, grad_output.double(), create_graph=True)):
        assert_as_accurate_as_eager(got.detach(), want.detach(), true.detach(), factor=2)
        if got is not None and got.shape == x.shape:  # a gradient penalty's second order
            second = [torch.autograd.grad(g.square().sum(), args[1])[0] for g, args in
                      ((got, ours), (want, eager), (true, truth))]
            assert_as_accurate_as_eager(*second, factor=2)


# The engine's transposed pass over few rows (f^T = Omega h^T): chunks of 32 outputs that the
# widths 70 and 45 do not fill, rows that fill no vector evenly, a 3-d input, with and without
# biases. Every hidden activation, with and without an output activation (those whose a' is
# read off f run there without autograd; recorded, they are a chain of layers); and every
# output activation (the output layer's f is at hand).
TRANSPOSED_CASES = [
    *[pytest.param([300, 70, 45, 3], name, p, out, id=f"hidden_{i}_{out}") for name, p, i in (
        (case.values[0], case.values[1], case.id) for case in NETWORK_ACTIVATIONS) for out in (None, "sigmoid")],
    *[pytest.param([300, 70, 20], "relu", case.values[1], case.values[0], id=f"output_{case.id}")
      for case in NETWORK_ACTIVATIONS],
]


@pytest.mark.parametrize("rows", [16, 17, 33, 64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("sizes,activation,params,output_activation", TRANSPOSED_CASES)
def test_the_transposed_pass_of_few_rows_is_as_close_to_float64_as_eager(cpu_capability, rows, bias, sizes,
                                                                          activation, params, output_activation):
    x, weights, biases, grad_output = random_network(sizes, rows, torch.float32, bias=bias)
    x, grad_output = x.view(1, rows, sizes[0]), grad_output.view(1, rows, sizes[-1])
    slope = params.get("negative_slope", 0.0)
    expected_path = "blas" if cpu_capability == "DEFAULT" else "transposed"
    assert forward_path(weights, rows, activation, slope, output_activation=output_activation) == expected_path
    truth_args = leaves([x.double(), *[w.double() for w in weights], *[b.double() for b in biases]])
    ours_args, eager_args = leaves([x, *weights, *biases]), leaves([x, *weights, *biases])
    n = len(weights)

    def eager(x, weights, biases, activation, output_activation, negative_slope=0.01, **softplus):
        return eager_network(x, weights, biases, activation, negative_slope, output_activation, **softplus)

    def network(args, run):
        return run(args[0], args[1:n + 1], args[n + 1:], activation, **params, output_activation=output_activation)

    out = network(ours_args, hf.mlp)
    with torch.no_grad():
        inference = network(ours_args, hf.mlp)  # nothing recorded: the transposed pass
    expected, truth = network(eager_args, eager), network(truth_args, eager)
    assert out.shape == inference.shape == (1, rows, sizes[-1])
    assert_as_accurate_as_eager(out, expected, truth, factor=2)
    assert_as_accurate_as_eager(inference, expected, truth, factor=2)
    for got, want, true in zip(torch.autograd.grad(out, ours_args, grad_output),
                               torch.autograd.grad(expected, eager_args, grad_output),
                               torch.autograd.grad(truth, truth_args, grad_output.double())):
        assert_as_accurate_as_eager(got, want, true, factor=2)
    # NaN and inf go where float64 eager's go (float32 eager's GELU gives NaN at inf: samples.py).
    x = x.detach().clone()
    x[0, 3, 2], x[0, 7, 0], x[0, 9, 5] = float("nan"), float("inf"), -float("inf")
    got = network([x, *weights, *biases], hf.mlp)
    want = network([t.double() for t in (x, *weights, *biases)], eager)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("every", [0, 1])
@pytest.mark.parametrize("sizes,rows", [([64, 64, 64, 64, 16], 3000), ([784, 256, 256, 10], 64),
                                        ([10, 40, 40, 5], 100), ([300, 256, 256, 10], 40)],
                         ids=["thin", "mnist", "fig7.8", "columns_shared"])  # one block: products' columns shared among threads
@pytest.mark.usefixtures("cpu_capability")
def test_the_network_gives_the_same_bits_on_every_run_and_thread_count(sizes, rows, every, dtype):
    x, weights, biases, grad_output = random_network(sizes, rows, dtype)
    n = len(weights)
    same_bits_for_every_thread_count(
        lambda x, *p: hf.mlp(x, list(p[:n]), list(p[n:]), "relu", checkpoint_every=every or None),
        [x, *weights, *biases], grad_output, blas=goes_to_blas(weights, rows, every=every))


def penalty_gradients(sizes, rows, dtype, activation, every, poison=False):
    """Through MLP's op: the output, the gradients of its sum (input and parameters), and the
    parameters' gradients of a gradient penalty, the input gradient's squared norm. With
    poison, every input and parameter is NaN."""
    x, weights, biases, _ = random_network(sizes, rows, dtype)
    args = leaves([t.fill_(float("nan")) if poison else t for t in (x, *weights, *biases)])
    n = len(weights)
    out = hf.mlp(args[0], list(args[1:n + 1]), list(args[n + 1:]), activation, 0.2, checkpoint_every=every)
    first = torch.autograd.grad(out.float().sum(), args, create_graph=True)
    second = torch.autograd.grad(first[0].float().square().sum(), args[1:], allow_unused=True)
    return [out.detach(), *(g.detach() for g in first), *(g for g in second if g is not None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("every", [None, 1])
@pytest.mark.parametrize("sizes,rows", [([10, 40, 40, 5], 10), ([10, 40, 40, 5], 100), ([33, 7, 65, 3], 300)],
                         ids=["fig7.8", "fig7.8_batch100", "odd_slots"])
@pytest.mark.usefixtures("cpu_capability")
def test_no_bit_depends_on_what_earlier_calls_left_in_the_scratch_memory(sizes, rows, every, dtype):
    # Small scratch buffers are kept by each thread from call to call (csrc/cpu/kernels/
    # engine.h, KeptBlocks), so a buffer read before the engine writes it holds what an
    # earlier call left. Calls of networks of other shapes, all NaN, come between two runs
    # of the same network, forward, backward and double backward.
    first = penalty_gradients(sizes, rows, dtype, "softplus", every)
    assert all(t.isfinite().all() for t in first)
    for other_sizes, other_rows in (([10, 40, 40, 5], 100), (sizes, rows), ([64, 64, 64], 50), ([3, 90, 2], 7)):
        penalty_gradients(other_sizes, other_rows, dtype, "softplus", every, poison=True)
        for activation in ("leaky_relu", "sigmoid"):
            x, weights, biases, grad_output = random_network(other_sizes, other_rows, dtype)
            gradients(lambda x, *p: hf.mlp(x, list(p[:len(weights)]), list(p[len(weights):]), activation),
                      [t.fill_(float("nan")) for t in (x, *weights, *biases)], grad_output)
    again = penalty_gradients(sizes, rows, dtype, "softplus", every)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation,slope,output_activation",
                         [("relu", 0.0, None), ("leaky_relu", -0.2, "sigmoid")],
                         ids=["relu", "leaky_negative_sigmoid_out"])  # the latter recomputes f everywhere
@pytest.mark.parametrize("rows", [3000, 100], ids=["slots", "one_block"])
@pytest.mark.usefixtures("cpu_capability")
def test_checkpointing_changes_no_bit(rows, activation, slope, output_activation, dtype):
    # The backward goes stretch by stretch, dl/dh carried between them for all rows; an
    # uneven last stretch (6 hidden layers, k = 4) and k = 1 too.
    x, weights, biases, grad_output = random_network([24, 32, 40, 32, 28, 32, 36, 8], rows, dtype)
    n = len(weights)

    def network(every):
        return lambda x, *p: hf.mlp(x, list(p[:n]), list(p[n:]), activation, slope, checkpoint_every=every,
                                    output_activation=output_activation)

    # Where BLAS runs the plain network (the DEFAULT path), one stretch of 6 is the reference.
    plain = 6 if goes_to_blas(weights, rows, activation, slope, 0, output_activation) else None
    reference = gradients(network(plain), [x, *weights, *biases], grad_output)
    for every in (1, 2, 4, 6):
        for got, want in zip(gradients(network(every), [x, *weights, *biases], grad_output), reference):
            assert torch.equal(got, want), f"checkpoint_every={every} changed the bits"


@pytest.mark.parametrize("fn", [hf.linear_relu, hf.linear_sigmoid, lambda x, w, b: hf.linear_leaky_relu(x, w, b, -0.2)],
                         ids=["relu", "sigmoid", "leaky_negative"])
@pytest.mark.parametrize("shape", [(65536, 64, 64), (3000, 256, 256), (10, 10, 40)], ids=str)
@pytest.mark.usefixtures("cpu_capability")
def test_the_layers_give_the_same_bits_on_every_run_and_thread_count(fn, shape):
    # The cache-blocked layer backward used to sum the weight gradient per thread, so its
    # bits changed with the thread count (2.4e-6 on the thin layer).
    rows, k, m = shape
    x, (weight,), (bias,), grad_output = random_network([k, m], rows, torch.float32)
    same_bits_for_every_thread_count(fn, [x, weight, bias], grad_output, blas=goes_to_blas([weight], rows))


@pytest.mark.usefixtures("cpu_capability")
def test_nan_and_inf_propagate_as_in_eager():
    x, weights, biases, grad_output = random_network([8, 32, 32, 4], 50, torch.float32)
    x[3, 2], x[7, 0], x[9, 5] = float("nan"), float("inf"), -float("inf")
    weights[1][5, 7] = float("nan")
    grad_output[11, 1] = float("inf")
    for activation in ("relu", "sigmoid", "leaky_relu"):
        ours_args, eager_args = leaves([x, *weights, *biases]), leaves([x, *weights, *biases])
        out = hf.mlp(ours_args[0], ours_args[1:4], ours_args[4:], activation, 0.1)
        expected = eager_network(eager_args[0], eager_args[1:4], eager_args[4:], activation, 0.1)
        results = zip([out, *torch.autograd.grad(out, ours_args, grad_output)],
                      [expected, *torch.autograd.grad(expected, eager_args, grad_output)])
        for got, want in results:
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
            finite = want.isfinite()
            torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("cpu_capability")
def test_non_contiguous_and_3d_inputs_and_expanded_gradients():
    _, weights, biases, _ = random_network([6, 20, 5], 0, torch.float64)
    base = torch.randn(4, 7, 12, dtype=torch.float64)
    for x in (base[..., ::2], base.transpose(0, 1)[..., :6], base[:, :, :6].contiguous()):
        ours_args, eager_args = leaves([x, *weights, *biases]), leaves([x, *weights, *biases])
        out = hf.mlp(ours_args[0], ours_args[1:3], ours_args[3:])
        expected = eager_network(eager_args[0], eager_args[1:3], eager_args[3:], "relu", 0.0)
        assert out.shape == expected.shape == (*x.shape[:-1], 5)
        torch.testing.assert_close(out, expected)
        grad_output = torch.randn(5, dtype=torch.float64).expand(out.shape)  # stride 0
        for got, want in zip(torch.autograd.grad(out, ours_args, grad_output),
                             torch.autograd.grad(expected, eager_args, grad_output)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("output_activation", [None, "sigmoid", "relu"])
def test_gradcheck_and_gradgradcheck_without_bias_and_with_an_output_activation(output_activation):
    g = torch.Generator().manual_seed(0)
    sizes = [4, 5, 6, 3]
    weights = [torch.randn(o, i, generator=g, dtype=torch.float64, requires_grad=True)
               for i, o in zip(sizes[:-1], sizes[1:])]
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def network(x, *weights):
        return ops.mlp(x, list(weights), [], "leaky_relu", 0.3, 0, output_activation)

    assert gradcheck(network, (x, *weights))
    assert gradgradcheck(network, (x, *weights))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_module_without_bias_and_with_an_output_activation(dtype):
    torch.manual_seed(0)
    model = hnn.MLP([6, 9, 8, 3], "leaky_relu", 0.1, bias=False, output_activation="sigmoid", dtype=dtype)
    stack = nn.Sequential(nn.Linear(6, 9, bias=False), nn.Linear(9, 8, bias=False), nn.Linear(8, 3, bias=False))
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k.replace("0.", "hidden.0.").replace("1.", "hidden.1.").replace("2.", "output."), v.shape)
        for k, v in stack.state_dict().items()]
    assert all(layer.bias is None for layer in [*model.hidden, model.output])
    assert "output_activation='sigmoid'" in repr(model)
    reference = twin(model)
    x = torch.randn(7, 6, dtype=torch.float64).to(dtype).requires_grad_()
    out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    grad_output = torch.randn(out.shape).to(dtype)
    for got, want in zip(torch.autograd.grad(out, [x, *model.parameters()], grad_output),
                         torch.autograd.grad(expected, [x, *reference.parameters()], grad_output)):
        torch.testing.assert_close(got, want, **tolerances(dtype))
    # Layer by layer (a hook on a layer) the output activation is applied too.
    handle = model.output.register_forward_hook(lambda *args: None)
    torch.testing.assert_close(model(x), expected, **tolerances(dtype))
    handle.remove()


def test_functional_mlp_takes_biases_none_and_output_activation():
    x, weights, biases, _ = random_network([4, 6, 2], 5, torch.float64)
    torch.testing.assert_close(hf.mlp(x, weights, None, output_activation="relu"),
                               eager_network(x, weights, [], "relu", 0.0, "relu"))
    torch.testing.assert_close(hf.mlp(x, weights, biases, "sigmoid", output_activation="sigmoid"),
                               eager_network(x, weights, biases, "sigmoid", 0.0, "sigmoid"))
    with pytest.raises(ValueError, match="output_activation must be None, 'relu', 'leaky_relu', 'sigmoid', 'tanh', 'silu', 'gelu', 'gelu_tanh' or 'softplus', got 'elu'"):
        hf.mlp(x, weights, biases, output_activation="elu")
    with pytest.raises(ValueError, match="output_activation must be None"):
        hnn.MLP([4, 2], output_activation="softmax")
    with pytest.raises(RuntimeError, match=r"mlp: got 2 weights but 1 biases; give one bias per layer, or none"):
        hf.mlp(x, weights, biases[:1])
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        ops.mlp(x, weights, biases, "relu", 0.0, 0, "elu")


def test_compile_fullgraph_and_export_with_the_new_arguments():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = hnn.MLP([6, 9, 3], "relu", bias=False, output_activation="sigmoid")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 6, requires_grad=True)
    out, expected = compiled(x), model(x)
    torch.testing.assert_close(out, expected)
    for a, b in zip(torch.autograd.grad(out.sum(), [x, *model.parameters()]),
                    torch.autograd.grad(expected.sum(), [x, *model.parameters()])):
        torch.testing.assert_close(a, b)
    program = torch.export.export(model, (x.detach(),))
    torch.testing.assert_close(program.module()(x.detach()), model(x.detach()))


def test_build_info_names_the_capability_and_micro_kernel_that_run(cpu_capability):
    import handgrad

    info = handgrad.build_info()
    assert info["cpu_capability"] == cpu_capability
    assert cpu_capability in info["cpu_micro_kernel"]
    assert cpu_capability in info["cpu_capabilities_built"]
    assert info["cpu_capability_offered"] == torch.backends.cpu.get_cpu_capability()
    assert info["cuda"] == handgrad.cuda_built()
