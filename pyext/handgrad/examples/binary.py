"""Problem 7.17: the figure 7.8 network changed for binary classification.

(i) binary targets, (ii) one output squashed into (0, 1) by the logistic sigmoid, (iii) the
binary cross-entropy loss. Trained with handgrad layers (the output layer is a fused
LinearSigmoid) and with torch.nn layers from the same seed; it prints and plots loss and
accuracy, and checks dl/df = sig[f] - y (problem 7.5) at the output layer.

    python -m handgrad.examples.binary [--out DIR] [--epochs N]
"""

import argparse

import torch
from torch import nn

import handgrad.nn as hnn
from handgrad.chapter7 import binary_cross_entropy_derivative

from ._plotting import figure, progress
from .fig7_8 import BATCH_SIZE, D_I, D_K, NUM_POINTS, he_init, optimizer_and_schedule


def make_model(layers, seed):
    torch.manual_seed(seed)
    if layers == "torch":
        model = nn.Sequential(nn.Linear(D_I, D_K), nn.ReLU(), nn.Linear(D_K, D_K), nn.ReLU(),
                              nn.Linear(D_K, 1), nn.Sigmoid())
    else:
        model = nn.Sequential(hnn.LinearReLU(D_I, D_K), hnn.LinearReLU(D_K, D_K),
                              hnn.LinearSigmoid(D_K, 1))
    return he_init(model)


def make_data(seed):
    """Random inputs labelled by a random teacher: y = I[v.x + noise > 0]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_POINTS, D_I, generator=g)
    teacher = torch.randn(D_I, generator=g)
    y = ((x @ teacher + 0.5 * torch.randn(NUM_POINTS, generator=g)) > 0).float().unsqueeze(1)
    return x, y


def train(model, x, y, epochs, seed, label):
    optimizer, scheduler = optimizer_and_schedule(model)
    order = torch.Generator().manual_seed(seed)
    losses, accuracies = [], []
    for _ in progress(range(epochs), epochs, label):
        for batch in torch.randperm(NUM_POINTS, generator=order).split(BATCH_SIZE):
            optimizer.zero_grad()
            nn.functional.binary_cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            p = model(x)
            losses.append(nn.functional.binary_cross_entropy(p, y).item())
            accuracies.append(((p > 0.5).float() == y).float().mean().item())
    return losses, accuracies


def check_output_gradient(model, x, y):
    """Largest |dl/dbeta - sum(sig[f] - y)| at the output layer, for the summed BCE loss.

    dl/dbeta of the output layer is the sum over the batch of dl/df, so it checks 7.5
    through handgrad's fused kernel, where f itself is never formed in Python.
    """
    output_layer = model[-1]
    model.zero_grad()
    loss = nn.functional.binary_cross_entropy(model(x), y, reduction="sum")
    loss.backward()
    with torch.no_grad():
        hidden = model[:-1](x)
        f = hidden @ output_layer.weight.T + output_layer.bias  # the output pre-activation
        expected = binary_cross_entropy_derivative(f, y).sum(0)
    return (output_layer.bias.grad - expected).abs().max().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, y = make_data(args.seed)
    runs = {}
    for layers in ("torch", "handgrad"):
        model = make_model(layers, args.seed)
        runs[layers] = train(model, x, y, args.epochs, args.seed, f"{layers:8s}")
        runs[layers + "_model"] = model
    print(f"{'epoch':>5}  {'torch.nn loss':>13}  {'handgrad loss':>13}  "
          f"{'torch.nn acc':>12}  {'handgrad acc':>12}")
    for epoch in range(args.epochs):
        if epoch == 0 or (epoch + 1) % 10 == 0:
            print(f"{epoch + 1:>5}  {runs['torch'][0][epoch]:>13.6f}  "
                  f"{runs['handgrad'][0][epoch]:>13.6f}  {runs['torch'][1][epoch]:>12.2f}  "
                  f"{runs['handgrad'][1][epoch]:>12.2f}")
    difference = max(abs(a - b) for a, b in zip(runs["torch"][0], runs["handgrad"][0]))
    print(f"max |loss difference|: {difference:.3e}")
    error = check_output_gradient(runs["handgrad_model"], x, y)
    print(f"dl/df = sig[f] - y (7.5) at the output layer: max error {error:.3e}")

    def draw(ax_loss, ax_acc):
        epochs = range(1, args.epochs + 1)
        for layers, style in (("torch", "-"), ("handgrad", "--")):
            ax_loss.plot(epochs, runs[layers][0], style, label=layers)
            ax_acc.plot(epochs, runs[layers][1], style, label=layers)
        ax_loss.set(xlabel="epoch", ylabel="binary cross-entropy", title="Loss (problem 7.17)")
        ax_acc.set(xlabel="epoch", ylabel="training accuracy", title="Accuracy", ylim=(0, 1.02))
        ax_loss.legend()
        ax_acc.legend()

    figure(args.out, "binary.png", draw, ncols=2, figsize=(10, 4))
    return {"losses": (runs["torch"][0], runs["handgrad"][0]),
            "accuracies": (runs["torch"][1], runs["handgrad"][1]), "output_gradient_error": error}


if __name__ == "__main__":
    main()
