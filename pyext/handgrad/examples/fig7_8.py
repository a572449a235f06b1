"""Problem 7.16: train the network of figure 7.8 with torch.nn layers and with handgrad layers.

D_i = 10 inputs, two hidden layers of D_k = 40 ReLU units, D_o = 5 outputs; He
initialisation and zero biases; 100 random points in batches of 10; least squares; SGD with
learning rate 0.1 and momentum 0.9, halved every 10 epochs; 100 epochs. Both runs start
from the same seed, so their losses agree to rounding: handgrad's fused kernels add in
another order than torch's BLAS, so the last bits differ. A third run, torch.nn in float64,
is the truth both are measured against.

    python -m handgrad.examples.fig7_8 [--out DIR] [--epochs N] [--every K]
"""

import argparse

import torch
from torch import nn

import handgrad.nn as hnn

from ._plotting import figure, progress

D_I, D_K, D_O = 10, 40, 5
NUM_POINTS, BATCH_SIZE = 100, 10


def make_model(layers, seed):
    """The figure 7.8 network built from `layers` ("torch" or "handgrad"), He-initialised."""
    torch.manual_seed(seed)
    if layers == "torch":
        model = nn.Sequential(
            nn.Linear(D_I, D_K), nn.ReLU(), nn.Linear(D_K, D_K), nn.ReLU(), nn.Linear(D_K, D_O)
        )
    else:
        model = nn.Sequential(hnn.LinearReLU(D_I, D_K), hnn.LinearReLU(D_K, D_K), nn.Linear(D_K, D_O))
    return he_init(model)


def he_init(model):
    """He initialisation of every linear layer (fused ones included), zero biases."""
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
    return model


def optimizer_and_schedule(model):
    """SGD with learning rate 0.1 and momentum 0.9, halved every 10 epochs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)


def make_data(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_POINTS, D_I, generator=generator)
    y = torch.randn(NUM_POINTS, D_O, generator=generator)
    return x, y


def train(model, x, y, epochs, seed, label="training"):
    """Train with the recipe of the problem; return the mean training loss of each epoch."""
    optimizer, scheduler = optimizer_and_schedule(model)
    loss_function = nn.MSELoss()
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in progress(range(epochs), epochs, label):
        total = 0.0
        for batch in torch.randperm(NUM_POINTS, generator=order).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss = loss_function(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        scheduler.step()
        losses.append(total / NUM_POINTS)
    return losses


def plot(torch_losses, handgrad_losses, out):
    def draw(ax):
        epochs = range(1, len(torch_losses) + 1)
        ax.plot(epochs, torch_losses, label="torch.nn (Linear + ReLU)", linewidth=3, alpha=0.5)
        ax.plot(epochs, handgrad_losses, "--", label="handgrad (LinearReLU)")
        ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel="training loss (MSE)",
               title="Figure 7.8 network, same seed (problem 7.16)")
        ax.legend()

    return figure(out, "fig7_8.png", draw)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures", help="folder for fig7_8.png")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--every", type=int, default=5, help="print every K-th epoch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, y = make_data(args.seed)
    torch_model = make_model("torch", args.seed)
    handgrad_model = make_model("handgrad", args.seed)
    same_start = all(
        torch.equal(a, b)
        for a, b in zip(torch_model.state_dict().values(), handgrad_model.state_dict().values())
    )
    truth_model = make_model("torch", args.seed).double()
    torch_losses = train(torch_model, x, y, args.epochs, args.seed, "torch.nn")
    handgrad_losses = train(handgrad_model, x, y, args.epochs, args.seed, "handgrad")
    truth = train(truth_model, x.double(), y.double(), args.epochs, args.seed, "float64")
    differences = [abs(a - b) for a, b in zip(torch_losses, handgrad_losses)]
    torch_errors = [abs(a - t) for a, t in zip(torch_losses, truth)]
    handgrad_errors = [abs(b - t) for b, t in zip(handgrad_losses, truth)]

    print(f"Figure 7.8 network: {D_I}-{D_K}-{D_K}-{D_O}, He init, {NUM_POINTS} points, "
          f"batch {BATCH_SIZE}, SGD(0.1, momentum 0.9), StepLR(10, 0.5)")
    print(f"identical initial parameters: {same_start}")
    print(f"{'epoch':>5}  {'torch.nn loss':>14}  {'handgrad loss':>14}  {'|difference|':>12}  "
          f"{'torch.nn err':>12}  {'handgrad err':>12}")
    for epoch in range(1, args.epochs + 1):
        if epoch == 1 or epoch % args.every == 0 or epoch == args.epochs:
            i = epoch - 1
            print(f"{epoch:>5}  {torch_losses[i]:>14.8f}  {handgrad_losses[i]:>14.8f}  "
                  f"{differences[i]:>12.3e}  {torch_errors[i]:>12.3e}  {handgrad_errors[i]:>12.3e}")
    print(f"max |difference| over all {args.epochs} epochs: {max(differences):.3e}")
    print(f"max error against the float64 run: torch.nn {max(torch_errors):.3e}, "
          f"handgrad {max(handgrad_errors):.3e}")

    plot(torch_losses, handgrad_losses, args.out)
    return torch_losses, handgrad_losses, truth


if __name__ == "__main__":
    main()
