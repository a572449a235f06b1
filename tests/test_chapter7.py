"""Every closed form of handgrad.chapter7 against torch autograd, reverse and forward mode,
in float64 at many random points; and the chapter's examples, run small."""

import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from handgrad import chapter7 as c7
from handgrad.examples import binary, checkpoint, init
from handgrad.memory import saved_bytes
from handgrad.nn import MLP

POINTS = 4000


def random_points(seed):
    """x and the 13 parameters of problem 7.1, one independent draw per point."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(POINTS, generator=g, dtype=torch.float64)
    p = {name: torch.randn(POINTS, generator=g, dtype=torch.float64) for name in c7.PARAMS_7_1}
    return x, p


def book_network(x, p):
    """Problem 7.1's equation as the book writes it, independently of handgrad.chapter7, with
    a[.] = torch.relu (derivative 0 at 0)."""
    a = torch.relu
    first = a(p["theta01"] + p["theta11"] * x)
    second = a(p["theta02"] + p["theta12"] * x)
    return (p["phi0"]
            + p["phi1"] * a(p["psi01"] + p["psi11"] * first + p["psi21"] * second)
            + p["phi2"] * a(p["psi02"] + p["psi12"] * first + p["psi22"] * second))


def relu_patterns(x, p):
    """Which of the four ReLUs of problem 7.1 are on, at each point."""
    z1, z2 = p["theta01"] + p["theta11"] * x, p["theta02"] + p["theta12"] * x
    h1, h2 = torch.relu(z1), torch.relu(z2)
    g1 = p["psi01"] + p["psi11"] * h1 + p["psi21"] * h2
    g2 = p["psi02"] + p["psi12"] * h1 + p["psi22"] * h2
    return {tuple(int(v) for v in row) for row in torch.stack([z1 > 0, z2 > 0, g1 > 0, g2 > 0], 1)}


def test_7_1_network_is_the_books():
    x, p = random_points(9)
    torch.testing.assert_close(c7.two_layer_net(x, p), book_network(x, p))


def test_7_1_params_order():
    assert c7.PARAMS_7_1 == ["phi0", "phi1", "phi2", "psi01", "psi11", "psi21", "psi02", "psi12",
                             "psi22", "theta01", "theta11", "theta02", "theta12"]


def test_7_1_points_reach_every_relu_pattern():
    assert relu_patterns(*random_points(0)) == set(itertools.product((0, 1), repeat=4))


@pytest.mark.parametrize("seed", [0, 1])
def test_7_1_derivatives_match_reverse_mode_autograd(seed):
    x, p = random_points(seed)
    p = {k: v.requires_grad_() for k, v in p.items()}
    y = book_network(x, p)
    grads = torch.autograd.grad(y.sum(), [p[name] for name in c7.PARAMS_7_1])
    closed = c7.two_layer_derivatives(x, p)
    assert set(closed) == set(c7.PARAMS_7_1)
    for name, grad in zip(c7.PARAMS_7_1, grads):
        torch.testing.assert_close(closed[name].detach(), grad, msg=f"dy/d{name}")


@pytest.mark.parametrize("name", c7.PARAMS_7_1)
def test_7_1_derivatives_match_forward_mode_autograd(name):
    x, p = random_points(2)
    with fwAD.dual_level():
        dual = dict(p, **{name: fwAD.make_dual(p[name], torch.ones(POINTS, dtype=torch.float64))})
        tangent = fwAD.unpack_dual(book_network(x, dual)).tangent
    torch.testing.assert_close(c7.two_layer_derivatives(x, p)[name], tangent)


def test_7_1_at_the_kinks_relus_derivative_is_zero():
    # x = -1 with every parameter 0.5 puts both first-layer units exactly at 0: I[0 > 0] = 0,
    # so nothing reaches the four theta. (clamp(min=0), whose derivative at 0 is 1, fails this.)
    x = torch.tensor([-1.0], dtype=torch.float64)
    p = {name: torch.tensor([0.5], dtype=torch.float64, requires_grad=True) for name in c7.PARAMS_7_1}
    grads = torch.autograd.grad(book_network(x, p).sum(), [p[name] for name in c7.PARAMS_7_1])
    closed = c7.two_layer_derivatives(x, p)
    for name, grad in zip(c7.PARAMS_7_1, grads):
        torch.testing.assert_close(closed[name].detach(), grad, msg=f"dy/d{name}")
    for name in ("theta01", "theta11", "theta02", "theta12"):
        assert closed[name].item() == 0.0
    # handgrad.chapter7's own network too: with every parameter 0 but phi1, g1 = 0 exactly,
    # and dy/dpsi01 = phi1 a'(0) = 0 under autograd as in the closed form.
    p = {name: torch.tensor(0.0, dtype=torch.float64, requires_grad=True) for name in c7.PARAMS_7_1}
    p["phi1"] = torch.tensor(1.0, dtype=torch.float64)
    x = torch.tensor(0.5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(c7.two_layer_net(x, p), p["psi01"])
    assert grad.item() == c7.two_layer_derivatives(x, p)["psi01"].item() == 0.0


def test_7_1_derivative_with_scalar_parameters_broadcasts():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    p = {name: torch.tensor(0.5, dtype=torch.float64) for name in c7.PARAMS_7_1}
    assert all(v.shape == x.shape for v in c7.two_layer_derivatives(x, p).values())


def toy_parameters(seed):
    g = torch.Generator().manual_seed(seed)
    beta = [0.3 * torch.randn(POINTS, generator=g, dtype=torch.float64) for _ in range(4)]
    omega = [0.5 * torch.randn(POINTS, generator=g, dtype=torch.float64) for _ in range(4)]
    x = torch.randn(POINTS, generator=g, dtype=torch.float64)
    y = torch.randn(POINTS, generator=g, dtype=torch.float64)
    return x, y, beta, omega


def test_7_2_toy_chain_matches_autograd():
    x, y, beta, omega = toy_parameters(3)
    nodes = c7.toy_chain(x.requires_grad_(), y, beta, omega)
    keys = ["f3", "h3", "f2", "h2", "f1", "h1", "f0"]
    grads = torch.autograd.grad(nodes["l"].sum(), [nodes[k] for k in keys])
    closed = c7.toy_chain_derivatives(x.detach(), y, beta, omega)
    for key, grad in zip(keys, grads):
        torch.testing.assert_close(closed[key], grad, msg=f"dl/d{key}")


# The toy chain after each node, so that forward mode can start from any node.
TOY_STEPS = [
    ("f0", lambda v, beta, omega: torch.sin(v)),
    ("h1", lambda v, beta, omega: beta[1] + omega[1] * v),
    ("f1", lambda v, beta, omega: torch.exp(v)),
    ("h2", lambda v, beta, omega: beta[2] + omega[2] * v),
    ("f2", lambda v, beta, omega: torch.cos(v)),
    ("h3", lambda v, beta, omega: beta[3] + omega[3] * v),
    ("f3", lambda v, beta, omega: v),
]


def toy_loss_from(node, value, y, beta, omega):
    names = [name for name, _ in TOY_STEPS]
    for _, step in TOY_STEPS[names.index(node):]:
        value = step(value, beta, omega)
    return (value - y) ** 2


@pytest.mark.parametrize("node", ["f3", "h3", "f2", "h2", "f1", "h1", "f0"])
def test_7_2_toy_chain_matches_forward_mode(node):
    x, y, beta, omega = toy_parameters(5)
    value = c7.toy_chain(x, y, beta, omega)[node]
    with fwAD.dual_level():
        loss = toy_loss_from(node, fwAD.make_dual(value, torch.ones_like(value)), y, beta, omega)
        tangent = fwAD.unpack_dual(loss).tangent
    torch.testing.assert_close(c7.toy_chain_derivatives(x, y, beta, omega)[node], tangent)


def test_7_2_loss_derivative_needs_the_target():
    # The worked answer's dl/df3 = 2 f3 is wrong unless y = 0.
    x, y, beta, omega = toy_parameters(4)
    f3 = c7.toy_chain(x, y, beta, omega)["f3"]
    assert not torch.allclose(c7.toy_chain_derivatives(x, y, beta, omega)["f3"], 2 * f3)


def graph_points(seed=11):
    """POINTS random x in [-3, 1], where y = exp[...] + sin[...] stays finite."""
    return -3 + 4 * torch.rand(POINTS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_7_12_reverse_mode_matches_autograd():
    x = graph_points().requires_grad_()
    nodes = c7.graph_7_12(x)
    keys = ["f5", "f4", "f3", "f2", "f1"]
    grads = torch.autograd.grad(nodes["y"].sum(), [nodes[k] for k in keys] + [x])
    closed = c7.reverse_mode(x.detach())
    for key, grad in zip(keys + ["x"], grads):
        torch.testing.assert_close(closed[key], grad, msg=f"dy/d{key}")


def y_from(node, value, x):
    """y as a function of one node of figure 7.9; nodes that do not depend on it stay fixed."""
    v = c7.graph_7_12(x)
    if node == "x":
        return c7.graph_7_12(value)["y"]
    if node == "f5":
        return v["f4"] + value
    if node == "f4":
        return value + v["f5"]
    f1 = value if node == "f1" else v["f1"]
    f2 = f1**2 if node == "f1" else (value if node == "f2" else v["f2"])
    f3 = value if node == "f3" else f1 + f2
    return torch.exp(f3) + torch.sin(f3)


@pytest.mark.parametrize("node", ["f5", "f4", "f3", "f2", "f1", "x"])
def test_7_12_reverse_mode_matches_forward_ad(node):
    x = graph_points()
    value = x if node == "x" else c7.graph_7_12(x)[node]
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(y_from(node, fwAD.make_dual(value, torch.ones_like(value)), x)).tangent
    torch.testing.assert_close(c7.reverse_mode(x)[node], tangent)


def test_7_13_forward_mode_matches_reverse_mode_autograd():
    x = graph_points().requires_grad_()
    nodes = c7.graph_7_12(x)
    closed = c7.forward_mode(x.detach())
    for key in ["f1", "f2", "f3", "f4", "f5", "y"]:
        (grad,) = torch.autograd.grad(nodes[key].sum(), x, retain_graph=True)
        torch.testing.assert_close(closed[key], grad, msg=f"d{key}/dx")


def test_7_13_forward_mode_matches_forward_ad():
    x = graph_points()
    with fwAD.dual_level():
        nodes = c7.graph_7_12(fwAD.make_dual(x, torch.ones_like(x)))
        tangents = {k: fwAD.unpack_dual(v).tangent for k, v in nodes.items()}
    closed = c7.forward_mode(x)
    for key in ["f1", "f2", "f3", "f4", "f5", "y"]:
        torch.testing.assert_close(closed[key], tangents[key], msg=f"d{key}/dx")
    torch.testing.assert_close(closed["y"], c7.reverse_mode(x)["x"])


def test_7_4_and_7_5_loss_derivatives():
    g = torch.Generator().manual_seed(12)
    f = (3 * torch.randn(POINTS, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randn(POINTS, generator=g, dtype=torch.float64)
    labels = (torch.rand(POINTS, generator=g, dtype=torch.float64) > 0.5).double()

    def least_squares(f):
        return (y - f) ** 2

    def binary_cross_entropy(f):  # the loss of 7.5, written out
        s = torch.sigmoid(f)
        return -(1 - labels) * torch.log(1 - s) - labels * torch.log(s)

    for loss, closed in ((least_squares, c7.least_squares_derivative(f.detach(), y)),
                         (binary_cross_entropy, c7.binary_cross_entropy_derivative(f.detach(), labels))):
        (grad,) = torch.autograd.grad(loss(f).sum(), f)  # reverse mode
        torch.testing.assert_close(closed, grad)
        _, tangent = torch.func.jvp(loss, (f.detach(),), (torch.ones_like(f),))  # forward mode
        torch.testing.assert_close(closed, tangent)


def test_7_8_autograd_cuts_the_graph_at_a_step_unit():
    f = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for activation in (c7.heaviside, c7.rect):
        assert activation(f).grad_fn is None
        assert not activation(f).requires_grad


def test_7_14_the_worked_answers_first_equality_needs_p_of_zero_to_be_zero():
    # a in {-1, 0, 1} with probabilities 1/4, 1/2, 1/4: symmetric, mean 0, variance 1/2
    values = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    p = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    variance = (p * values**2).sum()
    second_moment = (p * torch.relu(values) ** 2).sum()
    assert second_moment == variance / 2  # E[b^2] = sigma^2 / 2 holds
    nonnegative = values >= 0
    conditional = (p * values**2)[nonnegative].sum() / p[nonnegative].sum()  # E[b^2 | a >= 0]
    worked = 0.5 * conditional + 0.5 * 0.0  # its 1/2 E[b^2|a>=0] + 1/2 E[b^2|a<0]
    assert abs(worked - second_moment) > 0.05  # 1/6, not 1/4


@pytest.mark.parametrize("activation", [c7.heaviside, c7.rect], ids=["heaviside", "rect"])
def test_7_8_step_activations_block_gradients_but_the_last_layer_learns(activation):
    first, last, largest = c7.train_with_step_activation(activation)
    for name in ("omega0", "beta0", "omega1", "beta1"):  # before a step unit: autograd cuts
        assert largest[name] is None, name               # the graph, no gradient ever
    assert largest["omega2"] > 0 and largest["beta2"] > 0
    assert last < 0.5 * first  # the output layer fits the fixed random features


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("every", [1, 2, 3, 4])
def test_7_11_checkpointed_mlp_equals_plain_and_stores_less(activation, every):
    torch.manual_seed(0)
    sizes = [6, 12, 12, 12, 12, 3]
    plain = MLP(sizes, activation=activation)
    checkpointed = MLP(sizes, activation=activation, checkpoint_every=every)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(5, 6, dtype=torch.float32)
    for a, b in zip(torch.autograd.grad(plain(x).sum(), list(plain.parameters())),
                    torch.autograd.grad(checkpointed(x).sum(), list(checkpointed.parameters()))):
        torch.testing.assert_close(a, b)
    # It must store less, or it does not checkpoint: besides the input, the 4 hidden outputs,
    # or the inputs of the stretches after the first.
    layer, given = 5 * 12 * 4, x.numel() * 4
    assert saved_bytes(plain, x)[0] == given + 4 * layer
    stretches = (4 + every - 1) // every
    assert saved_bytes(checkpointed, x)[0] == given + (stretches - 1) * layer


def test_7_11_checkpointing_lowers_the_peak_memory_of_the_backward():
    # A batch of several of the fused kernel's blocks (at most 256 rows): it recomputes a
    # stretch one block at a time, so the recomputation's room is a few blocks' worth.
    results, difference = checkpoint.compare(depth=20, width=64, batch=1024, choices=(None, 5),
                                             repeats=1)
    (plain_stored, plain_peak, _), (stored, peak, _) = results[None], results[5]
    one_layer = 1024 * 64 * 4
    assert plain_stored >= 20 * one_layer  # every hidden output
    assert stored <= 4 * one_layer  # h_5, h_10, h_15 (and small change)
    assert peak < plain_peak - 5 * one_layer  # the recomputed stretch needs room, but less
    # The plain network's products run in BLAS (too few rows for the engine to pay), the
    # checkpointed one's in the engine: the same gradients up to the order of the sums.
    assert difference < 1e-6


def test_7_11_the_backward_packs_weights_for_one_stretch_at_a_time():
    # The example's network: packing Omega^T of every layer at once held 12.5 MiB more, a
    # peak of 81 % of the unchecked backward's; one stretch at a time gives 55 %.
    results, difference = checkpoint.compare(choices=(None, 5), repeats=1)
    (_, plain_peak, _), (_, peak, _) = results[None], results[5]
    assert peak <= 0.56 * plain_peak, f"peak {peak / plain_peak:.0%} of the unchecked backward's"
    assert difference < 1e-6  # BLAS runs the plain network's products (test_fused_mlp: bit for bit otherwise)


GC_CHECK = """
import gc
import torch
from handgrad.nn import MLP

model = MLP([32] * 12 + [1], checkpoint_every=3)
x = torch.randn(16, 32)
gc.collect()
gc.disable()
gc.set_debug(gc.DEBUG_SAVEALL)
for _ in range(3):
    model(x).square().mean().backward()
gc.collect()
print(sum(isinstance(o, torch.Tensor) for o in gc.garbage))
"""


def test_7_11_checkpointed_backward_leaves_nothing_for_the_garbage_collector():
    # In a fresh interpreter, so that no other test's garbage is counted: with the collector
    # off, three checkpointed steps leave no tensor that only a reference cycle holds.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", GC_CHECK], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_mlp_rejects_bad_arguments():
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
            MLP([2, 3, 1], checkpoint_every=every)
    with pytest.raises(ValueError, match="unknown activation 'elu'; expected 'relu', 'leaky_relu', 'sigmoid', 'tanh', 'silu', 'gelu', 'gelu_tanh' or 'softplus'"):
        MLP([2, 3, 1], activation="elu")


def test_example_binary(tmp_path):
    result = binary.main(["--epochs", "5", "--out", str(tmp_path)])
    torch_losses, handgrad_losses = result["losses"]
    assert max(abs(a - b) for a, b in zip(torch_losses, handgrad_losses)) < 1e-5
    assert result["output_gradient_error"] < 1e-5  # dl/df = sig[f] - y (7.5)
    assert (tmp_path / "binary.png").stat().st_size > 1000


def test_example_init(tmp_path):
    result = init.main(["--samples", "400000", "--out", str(tmp_path)])
    for sigma, estimate, exact in result["moments"]:  # 7.14
        assert abs(estimate - exact) < 0.02 * exact
    he, too_small = result["variances"]["He"], result["variances"]["too small (std 0.01)"]
    assert he[-1] > 1e-2 and too_small[-1] < 1e-30
    assert 0.4 < result["xavier_ratio"] < 0.6  # Xavier halves the variance at each layer
    relu, sigmoid = result["zero_init"]["relu"], result["zero_init"]["sigmoid"]  # 7.15
    assert [name for name, step in relu["first_step"].items() if step] == ["output.bias"]
    assert relu["output_bias_gradient"] > 0
    assert sigmoid["first_step"] == {"hidden.0.weight": 3, "hidden.0.bias": 3, "hidden.1.weight": 2,
                                     "hidden.1.bias": 2, "output.weight": 1, "output.bias": 1}
    # After 200 steps the units of a layer differ by rounding alone: one unit per layer, in effect.
    assert all(spread < 1e-5 for spread in sigmoid["unit_spread"].values())
    assert (tmp_path / "init.png").stat().st_size > 1000


def test_examples_run_without_matplotlib(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    results, difference = checkpoint.main(["--depth", "4", "--out", str(tmp_path)])
    assert difference < 1e-6 and set(results) == {None, 5, 10}
    assert "no figure checkpoint.png: matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "checkpoint.png").exists()


def test_example_checkpoint(tmp_path):
    results, difference = checkpoint.main(["--depth", "20", "--out", str(tmp_path)])
    assert set(results) == {None, 5, 10} and difference < 1e-6
    assert results[10][0] < results[None][0] and results[10][1] < results[None][1]
    assert (tmp_path / "checkpoint.png").stat().st_size > 1000
