"""fuse() on models written the ways real projects write them: dropout called with
training=self.training and `if self.training:` branches (the MNIST tutorial), methods and
attributes of their own (pytorch/examples' VAE and actor-critic), skip connections by
concatenation (nerf-pytorch), weight norm and branches on shapes (DeepSDF), optimizers and
their checkpoints built before fusing (nerf-pytorch's resume path).

Every test compares the fused model with an unfused deep copy of itself."""

import copy
import faulthandler
import gc
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import handgrad.nn as hnn


def fused_names(model, example_inputs=None):
    return {d.name for d in hnn.fusion_decisions(model, example_inputs) if d.fused}


def same_outputs_and_grads(fused, reference, *inputs, seed=0):
    torch.manual_seed(seed)
    out = fused(*inputs)
    torch.manual_seed(seed)
    expected = reference(*inputs)
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out.square().sum(), list(fused.parameters()))
    want = torch.autograd.grad(expected.square().sum(), list(reference.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


class MNISTNet(nn.Module):
    """The PyTorch tutorials' style: dropout as a call with the module's training flag."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 50), nn.Linear(50, 30), nn.Linear(30, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.dropout(x, p=0.5, training=self.training)
        x = torch.sigmoid(self.fc2(x))
        if self.training:  # a branch on the mode, not on data
            x = x * 0.5
        return F.log_softmax(self.fc3(x), dim=1)


@pytest.mark.parametrize("fused_in", ["train", "eval"])
def test_train_and_eval_behaviour_is_never_frozen(fused_in):
    torch.manual_seed(0)
    model = MNISTNet().train(fused_in == "train")
    reference = copy.deepcopy(model)
    hnn.fuse(model)
    assert fused_names(reference) == {"fc1", "fc2"}
    x = torch.randn(16, 20)
    for mode in ("train", "eval", "train", "eval"):  # switched after fusing, both ways
        model.train(mode == "train"), reference.train(mode == "train")
        same_outputs_and_grads(model, reference, x, seed=1)
    model.eval()
    assert torch.equal(model(x), model(x))  # no dropout in eval mode
    model.train()
    torch.manual_seed(2)
    first = model(x)
    assert not torch.equal(first, model(x))  # dropout in training mode


class VAE(nn.Module):
    """pytorch/examples' VAE: methods the project's own scripts call."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(40, 20), nn.Linear(20, 4), nn.Linear(20, 4)
        self.fc3, self.fc4 = nn.Linear(4, 20), nn.Linear(20, 40)
        self.rewards = []

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 40))
        return self.decode(mu + 0 * logvar), mu, logvar


def test_the_models_own_methods_and_attributes_survive():
    torch.manual_seed(0)
    model = VAE()
    reference = copy.deepcopy(model)
    fused = hnn.fuse(model)
    assert fused is model and type(fused) is VAE
    assert fused_names(reference) == {"fc1", "fc3", "fc4"}
    fused.rewards.append(1.0)  # a plain attribute
    x, z = torch.randn(8, 40), torch.randn(8, 4)
    for a, b in zip(fused(x), reference(x)):
        torch.testing.assert_close(a, b)
    # The project's own scripts call decode() directly: it computes what it always did.
    torch.testing.assert_close(fused.decode(z), reference.decode(z))
    torch.testing.assert_close(fused.encode(x)[0], reference.encode(x)[0])


class NeRF(nn.Module):
    """nerf-pytorch's MLP: layers in a ModuleList, a skip connection by concatenation."""

    def __init__(self, width=64, depth=6, skips=(3,)):
        super().__init__()
        self.skips = skips
        self.pts_linears = nn.ModuleList(
            [nn.Linear(3, width)] + [nn.Linear(width + (3 if i in skips else 0), width) for i in range(depth - 1)])
        self.output_linear = nn.Linear(width, 4)

    def forward(self, x):
        h = x
        for i, layer in enumerate(self.pts_linears):
            h = F.relu(layer(h))
            if i in self.skips:
                h = torch.cat([x, h], -1)
        return self.output_linear(h)


def test_skip_connections_and_parameter_order_and_an_optimizer_checkpoint_by_position():
    torch.manual_seed(0)
    model = NeRF()
    reference = copy.deepcopy(model)
    # nerf-pytorch's resume path: optimizer state saved from an unfused run, loaded by
    # position into the optimizer of the model that is then fused.
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    x = torch.randn(32, 3)
    reference(x).square().mean().backward()
    optimizer.step()
    checkpoint = io.BytesIO()
    torch.save({"model": reference.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    checkpoint.seek(0)
    saved = torch.load(checkpoint)

    model.load_state_dict(saved["model"])
    fused = hnn.fuse(model)
    assert fused_names(reference) == {f"pts_linears.{i}" for i in range(6)}
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in reference.named_parameters()]
    fused_optimizer = torch.optim.Adam(fused.parameters(), lr=1e-3)
    fused_optimizer.load_state_dict(saved["optimizer"])  # by position: the shapes fit
    for opt, net in ((optimizer, reference), (fused_optimizer, fused)):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    for a, b in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_an_optimizer_built_before_fusing_keeps_working():
    torch.manual_seed(0)
    model, reference = NeRF(), None
    reference = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, reference)]
    hnn.fuse(model)
    x = torch.randn(16, 3)
    for _ in range(3):
        for opt, net in zip(optimizers, (model, reference)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


class DeepSDFDecoder(nn.Module):
    """DeepSDF's decoder: weight-normed layers, dropout with the training flag, a branch on
    the input's shape."""

    def __init__(self, weight_norm):
        super().__init__()
        layers = [nn.Linear(7, 32), nn.Linear(32, 32), nn.Linear(32, 32)]
        self.layers = nn.ModuleList(weight_norm(layer) for layer in layers)
        self.last = nn.Linear(32, 1)

    def forward(self, input):
        x = input if input.shape[1] > 3 else F.pad(input, (0, 4))  # a branch on a shape
        for layer in self.layers:
            x = F.relu(layer(x))
            x = F.dropout(x, p=0.2, training=self.training)
        return torch.tanh(self.last(x))


WEIGHT_NORMS = {
    "weight_norm": torch.nn.utils.weight_norm,  # a forward pre-hook
    "parametrizations.weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
}


@pytest.mark.parametrize("norm", WEIGHT_NORMS)
def test_weight_norm_and_a_branch_on_shapes_fuse_with_example_inputs(norm):
    # Built twice from one seed: torch.nn.utils.weight_norm's modules cannot be deep-copied.
    model, reference = (DeepSDFDecoder(WEIGHT_NORMS[norm]).eval() for _ in range(2) if not torch.manual_seed(0) is None)
    with pytest.warns(UserWarning, match="example_inputs"):
        assert fused_names(reference) == set()  # without example inputs it cannot be traced
    x = torch.randn(10, 7)
    hnn.fuse(model, example_inputs=(x,))
    assert fused_names(reference, (x,)) == {"layers.0", "layers.1", "layers.2"}
    assert handgrad_calls(model, x) == 3
    for inputs in (x, torch.randn(25, 7), torch.randn(6, 3)):  # other batches, the other branch
        same_outputs_and_grads(model, reference, inputs)
    model.train(), reference.train()
    same_outputs_and_grads(model, reference, torch.randn(12, 7), seed=3)
    # The gradients reach the parametrization's (or the hook's) own parameters.
    names = {n for n, _ in model.named_parameters()}
    assert any("original" in n or "weight_g" in n for n in names)


def handgrad_calls(model, x):
    from test_fuse import handgrad_ops

    return handgrad_ops(model, x).count("linear_activation")


def test_a_weight_normed_layer_in_a_sequential_becomes_fused_in_place():
    for norm in WEIGHT_NORMS.values():
        model, reference = (nn.Sequential(norm(nn.Linear(5, 8)), nn.LeakyReLU(0.2), nn.Linear(8, 2))
                            for _ in range(2) if torch.manual_seed(0) is not None)
        linear = model[0]
        hnn.fuse(model)
        assert model[0] is linear and isinstance(model[0], hnn.LinearLeakyReLU)
        assert type(model[1]) is nn.Identity
        same_outputs_and_grads(model, reference, torch.randn(4, 5))


def test_hooks_that_see_the_output_keep_a_layer_unfused_and_say_which(capsys):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    model[0].register_forward_hook(lambda *args: None)
    model[2].register_full_backward_hook(lambda *args: None)
    model[4].register_forward_pre_hook(lambda module, args: None)  # sees the input only
    hnn.fuse(model, verbose=True)
    printed = capsys.readouterr().out
    assert "0: not fused, it has a forward hook" in printed
    assert "2: not fused, it has a backward hook" in printed
    assert "4: fused" in printed


def test_deepcopy_pickle_to_and_compile_after_fusing():
    torch.manual_seed(0)
    model = MNISTNet().eval()
    reference = copy.deepcopy(model)
    hnn.fuse(model)
    x = torch.randn(4, 20)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied) is MNISTNet and copied is not model
        torch.testing.assert_close(copied(x), reference(x))
        assert handgrad_calls(copied, x) == 2  # still fused, on the copy's own layers
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(copied.parameters(), model.parameters()))
    double = copy.deepcopy(model).double()
    torch.testing.assert_close(double(x.double()), copy.deepcopy(reference).double()(x.double()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x))


def test_inplace_false_returns_a_fused_copy_and_leaves_the_model():
    model = MNISTNet()
    fused = hnn.fuse(model, inplace=False)
    assert fused is not model and type(fused) is MNISTNet
    assert "forward" not in model.__dict__ and "forward" in fused.__dict__
    x = torch.randn(3, 20)
    model.eval(), fused.eval()
    torch.testing.assert_close(fused(x), model(x))


def test_fusing_twice_is_the_same_as_once():
    torch.manual_seed(0)
    model = MNISTNet().eval()
    reference = copy.deepcopy(model)
    hnn.fuse(hnn.fuse(model))
    x = torch.randn(3, 20)
    torch.testing.assert_close(model(x), reference(x))
    assert handgrad_calls(model, x) == 2


def _ddp_worker(rank, world_size, store_path, x, out_path):
    import torch.distributed as dist

    faulthandler.enable()  # a crash in the teardown prints where each thread was
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(hnn.fuse(MNISTNet().eval()))
    shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    (model(x[shard]).square().sum() * world_size / len(x)).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out_path)
    # The process group must die inside destroy_process_group, not in the interpreter's
    # teardown, where gloo's threads can abort: nothing may still hold it (DDP does).
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_a_fused_model_trains_under_ddp(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    x = torch.randn(16, 20)
    out_path = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), x, out_path), nprocs=2, join=True)
    torch.manual_seed(0)
    reference = MNISTNet().eval()
    (reference(x).square().sum() / len(x)).backward()
    for got, want in zip(torch.load(out_path), [p.grad for p in reference.parameters()]):
        torch.testing.assert_close(got, want)
