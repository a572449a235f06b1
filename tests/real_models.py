"""Model code written the ways public projects write it, for fuse() to be tested
(test_fuse_real_models.py) and timed (benchmarks/bench_networks.py) on. The defaults are
test-sized; the benchmark builds the projects' own sizes."""

import torch
import torch.nn.functional as F
from torch import nn


class MNISTNet(nn.Module):
    """The PyTorch tutorials' style: dropout as a call with the module's training flag."""

    def __init__(self, sizes=(20, 50, 30, 10)):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.dropout(x, p=0.5, training=self.training)
        x = torch.sigmoid(self.fc2(x))
        if self.training:  # a branch on the mode, not on data
            x = x * 0.5
        return F.log_softmax(self.fc3(x), dim=1)


class MNISTClassifier(nn.Module):
    """The PyTorch tutorials' style: activations and dropout as calls in forward."""

    def __init__(self, sizes=(784, 256, 256, 10)):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = F.dropout(F.relu(self.fc1(x)), 0.2, training=self.training)
        x = F.dropout(F.relu(self.fc2(x)), 0.2, training=self.training)
        return F.log_softmax(self.fc3(x), dim=1)


class VAE(nn.Module):
    """pytorch/examples' VAE (784-400-20 there): methods the project's own scripts call."""

    def __init__(self, features=40, hidden=20, latent=4):
        super().__init__()
        self.features = features
        self.fc1, self.fc21, self.fc22 = nn.Linear(features, hidden), nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, features)
        self.rewards = []

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        if not self.training:
            return mu
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, self.features))
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


class NeRF(nn.Module):
    """nerf-pytorch's MLP (width 256, depth 8, 63 inputs there): layers in a ModuleList, a
    skip connection by concatenation."""

    def __init__(self, width=64, depth=6, skips=(3,), inputs=3):
        super().__init__()
        self.skips = skips
        self.pts_linears = nn.ModuleList([nn.Linear(inputs, width)] + [
            nn.Linear(width + (inputs if i in skips else 0), width) for i in range(depth - 1)])
        self.output_linear = nn.Linear(width, 4)

    def forward(self, x):
        h = x
        for i, layer in enumerate(self.pts_linears):
            h = F.relu(layer(h))
            if i in self.skips:
                h = torch.cat([x, h], -1)
        return self.output_linear(h)


class DeepSDFDecoder(nn.Module):
    """DeepSDF's decoder (512 wide there): weight-normed layers, dropout with the training
    flag, a branch on the input's shape."""

    def __init__(self, weight_norm, width=32, depth=3, inputs=7):
        super().__init__()
        self.inputs = inputs
        layers = [nn.Linear(inputs, width)] + [nn.Linear(width, width) for _ in range(depth - 1)]
        self.layers = nn.ModuleList(weight_norm(layer) for layer in layers)
        self.last = nn.Linear(width, 1)

    def forward(self, input):
        x = input if input.shape[1] > 3 else F.pad(input, (0, self.inputs - 3))  # a branch on a shape
        for layer in self.layers:
            x = F.relu(layer(x))
            x = F.dropout(x, p=0.2, training=self.training)
        return torch.tanh(self.last(x))


class ActorCritic(nn.Module):
    """pytorch/examples' actor-critic (CartPole): a shared layer, two heads, and the episode's
    record kept on the model."""

    def __init__(self, observations=4, hidden=128, actions=2):
        super().__init__()
        self.affine1 = nn.Linear(observations, hidden)
        self.action_head = nn.Linear(hidden, actions)
        self.value_head = nn.Linear(hidden, 1)
        self.saved_actions, self.rewards = [], []

    def forward(self, x):
        x = F.relu(self.affine1(x))
        return F.softmax(self.action_head(x), dim=-1), self.value_head(x)


class STNClassifier(nn.Module):
    """The PyTorch tutorial's spatial transformer network on MNIST: a localisation network
    and its fully connected regressor in Sequentials with in-place ReLUs, then a classifier
    whose dropout is a call."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 10, kernel_size=5), nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1, self.fc2 = nn.Linear(320, 50), nn.Linear(50, 10)
        self.localization = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=7), nn.MaxPool2d(2, stride=2), nn.ReLU(True),
            nn.Conv2d(8, 10, kernel_size=5), nn.MaxPool2d(2, stride=2), nn.ReLU(True))
        self.fc_loc = nn.Sequential(nn.Linear(10 * 3 * 3, 32), nn.ReLU(True), nn.Linear(32, 3 * 2))
        self.fc_loc[2].weight.data.zero_()
        self.fc_loc[2].bias.data.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float))

    def stn(self, x):
        xs = self.localization(x).view(-1, 10 * 3 * 3)
        theta = self.fc_loc(xs).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.size(), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)

    def forward(self, x):
        x = self.stn(x)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


class TorchvisionMLP(nn.Sequential):
    """torchvision.ops.MLP, built as it builds itself: Linear, activation, Dropout per hidden
    layer, then the last Linear and a Dropout."""

    def __init__(self, in_channels, hidden_channels, dropout=0.0, inplace=None):
        params = {} if inplace is None else {"inplace": inplace}
        layers, in_dim = [], in_channels
        for hidden_dim in hidden_channels[:-1]:
            layers += [nn.Linear(in_dim, hidden_dim), nn.ReLU(**params), nn.Dropout(dropout, **params)]
            in_dim = hidden_dim
        layers += [nn.Linear(in_dim, hidden_channels[-1]), nn.Dropout(dropout, **params)]
        super().__init__(*layers)


class GANDiscriminator(nn.Module):
    """PyTorch-GAN's discriminator (gan.py): a Sequential with in-place LeakyReLU(0.2) and a
    Sigmoid at the end, the image flattened in forward."""

    def __init__(self, features=784):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(features, 512), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(512, 256), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(256, 1), nn.Sigmoid())

    def forward(self, img):
        return self.model(img.view(img.size(0), -1))
