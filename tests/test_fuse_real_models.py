"""fuse() on models written the ways real projects write them (tests/real_models.py): dropout
called with training=self.training and `if self.training:` branches (the MNIST tutorial),
methods and attributes of their own (pytorch/examples' VAE and actor-critic), skip
connections by concatenation (nerf-pytorch), weight norm and branches on shapes (DeepSDF),
Sequentials with in-place activations and dropout (torchvision's MLP, PyTorch-GAN, the
spatial transformer tutorial), optimizers and their checkpoints built before fusing
(nerf-pytorch's resume path).

Every test compares the fused model with an unfused deep copy of itself."""

import copy
import faulthandler
import gc
import io
import pickle

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import handgrad.nn as hnn
from samples import handgrad_ops
from real_models import (ActorCritic, DeepSDFDecoder, GANDiscriminator, MNISTNet, NeRF, STNClassifier,
                         TorchvisionMLP, VAE)


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


def test_the_models_own_methods_and_attributes_survive():
    torch.manual_seed(0)
    model = VAE()
    reference = copy.deepcopy(model)
    fused = hnn.fuse(model)
    assert fused is model and type(fused) is VAE
    assert fused_names(reference) == {"fc1", "fc3", "fc4"}
    fused.rewards.append(1.0)  # a plain attribute
    x, z = torch.randn(8, 40), torch.randn(8, 4)
    torch.manual_seed(0)  # the reparameterisation draws noise in training mode
    got = fused(x)
    torch.manual_seed(0)
    for a, b in zip(got, reference(x)):
        torch.testing.assert_close(a, b)
    # The project's own scripts call decode() directly: it computes what it always did.
    torch.testing.assert_close(fused.decode(z), reference.decode(z))
    torch.testing.assert_close(fused.encode(x)[0], reference.encode(x)[0])


def test_an_actor_critic_keeps_its_record_and_both_heads():
    torch.manual_seed(0)
    model = ActorCritic()
    reference = copy.deepcopy(model)
    hnn.fuse(model)
    assert fused_names(reference) == {"affine1"}
    model.saved_actions.append((0, 1.0))  # the project's training loop writes these
    state = torch.randn(1, 4)  # one observation at a time, as the example steps CartPole
    (probs, value), (want_probs, want_value) = model(state), reference(state)
    torch.testing.assert_close(probs, want_probs)
    torch.testing.assert_close(value, want_value)
    grads = torch.autograd.grad(probs.log()[0, 1] * value.sum(), list(model.parameters()))
    wanted = torch.autograd.grad(want_probs.log()[0, 1] * want_value.sum(), list(reference.parameters()))
    for a, b in zip(grads, wanted):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make,x,expected", [
    (lambda: TorchvisionMLP(12, [16, 16, 3], dropout=0.1), torch.randn(9, 12), {"0", "3"}),
    (lambda: GANDiscriminator(features=48), torch.randn(6, 3, 4, 4), {"model.0", "model.2", "model.4"}),
    (STNClassifier, torch.randn(4, 1, 28, 28), {"fc_loc.0", "fc1"}),
], ids=["torchvision_mlp", "gan_discriminator", "stn"])
def test_sequentials_with_inplace_activations_and_dropout_fuse(make, x, expected):
    torch.manual_seed(0)
    model = make()
    reference = copy.deepcopy(model)
    hnn.fuse(model)
    assert fused_names(reference) == expected
    for mode in ("train", "eval"):
        model.train(mode == "train"), reference.train(mode == "train")
        same_outputs_and_grads(model, reference, x, seed=4)


def test_inplace_dropout_after_an_activation_fails_in_training_as_in_eager():
    # torchvision's MLP(inplace=True): the in-place dropout overwrites the activation's output,
    # which its backward needs. Eager raises in the backward; the fused layer must too.
    torch.manual_seed(0)
    model = TorchvisionMLP(12, [16, 3], dropout=0.1, inplace=True)
    reference = copy.deepcopy(model)
    hnn.fuse(model)
    assert fused_names(reference) == {"0"}
    x = torch.randn(9, 12)
    for net in (reference, model):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            net(x).sum().backward()
    model.eval(), reference.eval()  # dropout is then the identity: both work
    same_outputs_and_grads(model, reference, x)


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


WEIGHT_NORMS = {
    "weight_norm": torch.nn.utils.weight_norm,  # a forward pre-hook
    "parametrizations.weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
}


@pytest.mark.parametrize("norm", WEIGHT_NORMS)
@pytest.mark.parametrize("traced", ["at the first call", "for example_inputs"])
def test_weight_norm_and_a_branch_on_shapes_fuse(norm, traced):
    # Built twice from one seed: torch.nn.utils.weight_norm's modules cannot be deep-copied.
    model, reference = (DeepSDFDecoder(WEIGHT_NORMS[norm]).eval() for _ in range(2) if not torch.manual_seed(0) is None)
    layers = {"layers.0", "layers.1", "layers.2", "last"}  # last: before the tanh
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a branch on shapes is no reason to warn
        undecided = hnn.fusion_decisions(reference)
        x = torch.randn(10, 7)
        hnn.fuse(model, example_inputs=(x,) if traced == "for example_inputs" else None)
        same_outputs_and_grads(model, reference, x)  # the first call: traced for x's shape
    assert {d.name for d in undecided} == layers and not any(d.fused for d in undecided)
    assert all(d.reason.startswith("decided at the first call") for d in undecided)
    assert fused_names(reference, (x,)) == layers
    assert handgrad_calls(model, x) == 4
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


def test_a_weight_normed_layer_in_a_sequential_fuses():
    for norm in WEIGHT_NORMS.values():
        model, reference = (nn.Sequential(norm(nn.Linear(5, 8)), nn.LeakyReLU(0.2), nn.Linear(8, 2))
                            for _ in range(2) if torch.manual_seed(0) is not None)
        linear = model[0]
        hnn.fuse(model)
        assert model[0] is linear and type(model[1]) is nn.LeakyReLU
        assert handgrad_ops(model, torch.randn(4, 5)) == ["linear_activation"]
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


def test_dynamic_quantization_of_a_fused_sequential_quantizes_its_linear_layers():
    # torch.ao's quantize_dynamic swaps nn.Linear modules by their exact type: the members of
    # a fused nn.Sequential are still nn.Linear, so it quantizes them, and the container's
    # forward runs the quantized modules as nn.Sequential's would.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(hnn.fuse(copy.deepcopy(model)), {nn.Linear})
        want = torch.ao.quantization.quantize_dynamic(model, {nn.Linear})
    assert [type(m) for m in quantized] == [type(m) for m in want] and type(want[0]) is not nn.Linear
    x = torch.randn(10, 10)
    assert handgrad_ops(quantized, x) == []
    torch.testing.assert_close(quantized(x), want(x), rtol=0, atol=0)


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


def test_torch_compile_of_a_model_traced_at_its_first_call():
    # Inside torch.compile the first trace is not made (dynamo traces forward itself): the
    # model's own forward runs; after an eager call, the fused program is what it compiles.
    model, reference = (DeepSDFDecoder(parametrizations.weight_norm).eval()
                        for _ in range(2) if torch.manual_seed(0) is not None)
    hnn.fuse(model)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    x = torch.randn(10, 7)
    torch.testing.assert_close(compiled(x), reference(x))
    assert model.forward.programs == {}  # nothing traced inside the compile
    same_outputs_and_grads(model, reference, x)  # the eager first call traces it
    assert handgrad_calls(model, x) == 4
    torch.testing.assert_close(compiled(x), reference(x))
