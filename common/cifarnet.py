"""CifarNet: a small network trained from scratch at CIFAR-10's own 32x32 pixels, with the ideas of airbench.

Level 4's other members are ImageNet networks fed CIFAR images blown up to 128 or 224 px. This one is the
opposite kind: built for 32x32, no pretrained weights, so its mistakes differ from theirs, and that difference
is what an ensemble feeds on. Each idea below is from Keller Jordan's airbench ("94% on CIFAR-10 in 3.29
seconds on a single GPU", arXiv 2404.00498, 2024; github.com/KellerJordan/cifar10-airbench), rewritten here in
the project's own code and words, with the reason for each next to it. The network is airbench94's: widths
64/256/256, 0.24 GFLOP per image forward (--cifarnet-widths 64,128,128 is airbench93's, a quarter of the
FLOPs for about a point less accuracy).

Evidence, one run each (`python run.py level 4 --profile cpu --models cifarnet`, the 40,000-image split of the
shared JPEG copy, seed 42):
- widths 64,256,256, 16 epochs, bf16, on a 2-core AMD EPYC with AVX-512 and bf16 hardware (483 img/s): 90.63% test
  with TTA (89.68% without), 21.7 min of training, 25.1 min in all (results/cpu/level4.json at commit 84e7949);
- the same at 19 epochs (--cifarnet-epochs 19, what fits 30 min), same machine, code 5b01604: 90.56% test with TTA,
  23.6 min of training, 27.4 min in all; train accuracy 99.2% against 89.4% on validation in the last epoch, so
  longer training only overfits these 40,000 images (not kept as a record);
- the same at 10 epochs (--cifarnet-epochs 10, airbench94's count), same kind of machine, code 9888257: 90.00% test
  with TTA (89.20% without), 12.6 min of training, 15.5 min in all; train accuracy 95.8% against 88.6% on validation:
  the six epochs more of the profile are worth 0.6 points (not kept as a record);
- the same 16 epochs in fp32 (--precision fp32), same machine, code f1493e4: 90.75% test with TTA (89.65% without),
  34.3 min of training at about 310 img/s: bf16 costs this network no accuracy (within one seed's noise) and
  trains 1.6x faster, so the CPU profile keeps bf16 (not kept as a record);
- airbench96's stronger augmentation at 16 epochs, one run each (docs/cpu-profile.md): 4-px translations 90.64% test,
  12-px Cutout 89.76%; less overfitting, no better accuracy, so the recipe keeps 2 px and no Cutout;
- widths 64,128,128, 10 epochs, fp32, on a 2-core AMD EPYC without AVX-512 (about 300 img/s): 88.27% test with TTA,
  28.9 min of training (docs/results-history.md).
All are short of what airbench reports (93.0% for 64,128,128 in 11 epochs, 94.0% for 64,256,256 in 10) on the
official 50,000 images. A line-by-line comparison with airbench's code found the same recipe but for two details,
each measured here without effect (seed 42, the profile's 16 epochs, 7 December): airbench freezes the whitening
layer's bias after 3 epochs (patched by a script outside the repository, code 83a7198: 90.63% test with TTA, 90.70%
validation, 19.4 min of training; its first 3 epochs bit for bit the profile's), and it weighs its TTA views
unequally (it averages logits, the plain image and its mirror at 1/4 each, the four translated views at 1/8; the
profile's model predicted that way offline: 90.64% test, 90.69% validation), against the profile's 90.63% test and
90.79% validation. The gap is most likely the data (a fifth fewer images, and a JPEG copy at quality 75 whose chroma
subsampling halves the colour resolution at 32 px), not measured here: the official data is not on this machine.

Sections: Hyperparameters, Network (with the whitening initialization), Data (alternating flip, translate),
Optimizer (Nesterov SGD with lookahead, warm-up then decay), Training (train(): the whole recipe, which Level 4
calls for this member). Its test-time views (the mirror and 1-px translations) are in common/augment.py's
tta_views(translates=True), beside the other members' views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.device import SetupError
from common.models import normalization
from common.training import EpochCountingBatches, TensorBatches, fit, model_input

# ----------------------------------------------------------------------------------------------------------
#                                            Hyperparameters


@dataclass(frozen=True)
class CifarNetRecipe:
    """airbench94's hyperparameters. Learning rate and weight decay are in airbench's *decoupled* form (per 1024
    images, and independent of the momentum), so that each can be tuned alone; make_optimizer() converts them."""

    epochs: int = 10  # airbench94 trains 9.9 epochs of 50,000 images
    widths: tuple[int, int, int] = (64, 256, 256)
    batch_size: int = 1024
    lr: float = 11.5  # per 1024 images
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1024 images, not multiplied by the learning rate
    bias_scaler: float = 64.0  # BatchNorm biases learn 64x faster (their weight decay stays the same)
    label_smoothing: float = 0.2
    warmup: float = 0.23  # fraction of the steps over which the learning rate rises from 0.2x to 1x...
    final_lr: float = 0.07  # ...then falls linearly to 0.07x at the last step
    translate: int = 2  # random shifts of up to 2 px (reflection-padded)
    batchnorm_momentum: float = 0.6  # airbench's convention: the weight of the *old* running statistics
    output_scale: float = 1 / 9  # the logits are scaled down: a temperature that suits label smoothing 0.2
    whiten_eps: float = 5e-4
    whiten_images: int = 5000  # training images (of every class) whose 2x2 patches set the whitening layer
    lookahead_every: int = 5  # steps between two lookahead updates


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's training images, per channel (not ImageNet's: no pretraining)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def parse_widths(text: str) -> tuple[int, int, int]:
    """--cifarnet-widths "64,256,256" -> (64, 256, 256)."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 3 or min(widths) < 1:
        raise SetupError(f"--cifarnet-widths must be three positive integers such as 64,256,256, not '{text}'.")
    return widths  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
#                                                Network


class Conv(nn.Conv2d):
    """A 3x3 convolution without bias (a BatchNorm follows), started close to the identity: the first
    in_channels filters are Dirac deltas (output channel i copies input channel i), so at step 0 a block
    passes its input through, like a residual network's skip connection, and gradients reach every layer."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(channels_in, channels_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[:self.in_channels])


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1 and only the shift learned: the convolution before it can scale on its
    own, and one fewer set of parameters to tune (airbench)."""

    def __init__(self, channels: int, momentum: float):
        super().__init__(channels, eps=1e-12, momentum=1 - momentum)  # PyTorch's momentum is the new value's weight
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    """conv -> max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU.

    Pooling right after the first convolution (not at the end of the block) makes the second convolution, the
    normalizations and activations run on a quarter of the pixels: most of the block's cost goes away, little
    of its accuracy."""

    def __init__(self, channels_in: int, channels_out: int, batchnorm_momentum: float):
        super().__init__()
        self.conv1 = Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(channels_out, batchnorm_momentum)
        self.conv2 = Conv(channels_out, channels_out)
        self.norm2 = BatchNorm(channels_out, batchnorm_momentum)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        return self.activation(self.norm2(self.conv2(x)))


class CifarNet(nn.Module):
    """whitening 2x2 conv -> GELU -> three ConvGroups (32 -> 15 -> 7 -> 3 px) -> 3x3 max-pool -> linear -> x1/9."""

    def __init__(self, widths=CifarNetRecipe.widths, batchnorm_momentum: float = CifarNetRecipe.batchnorm_momentum,
                 output_scale: float = CifarNetRecipe.output_scale, num_classes: int = 10):
        super().__init__()
        # 2x2 patches of 3 channels have 12 dimensions; the layer has 24 filters: each whitened direction and
        # its negative, so that the GELU after it keeps both signs of every direction
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data (init_whitening), then frozen
        nn.init.zeros_(self.whiten.bias)
        self.blocks = nn.Sequential(ConvGroup(24, widths[0], batchnorm_momentum),
                                    ConvGroup(widths[0], widths[1], batchnorm_momentum),
                                    ConvGroup(widths[1], widths[2], batchnorm_momentum))
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.output_scale = output_scale
        self.widths = tuple(widths)
        # what common.models.normalization() reads: this network sees CIFAR-normalized images
        self.pretrained_cfg = dict(architecture="cifarnet", mean=CIFAR_MEAN, std=CIFAR_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * self.output_scale

    def get_classifier(self) -> nn.Module:
        return self.head


@torch.no_grad()
def init_whitening(model: CifarNet, images: torch.Tensor, eps: float = CifarNetRecipe.whiten_eps) -> None:
    """Set the first layer to whiten 2x2 patches: its filters are the eigenvectors of the patches' covariance,
    each divided by the square root of its eigenvalue (and each also negated).

    After it, every direction of patch space has unit variance and none correlates with another, so the first
    trainable layer starts from decorrelated inputs, which plain SGD learns from much faster (the classic ZCA
    argument; Coates & Ng 2011 for patches). `images`: normalized float N x 3 x 32 x 32 training images."""
    x = images.float()
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)  # every 2x2 patch
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)  # largest first, one per row
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)[:, None]).reshape(12, 3, 2, 2)
    model.whiten.weight.copy_(torch.cat([filters, -filters]))


# ----------------------------------------------------------------------------------------------------------
#                                 Data: alternating flip and translation


def translate(images: torch.Tensor, shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Move each image by its own random offset of -shift..shift pixels in x and y, the border filled by
    reflection (a mirrored edge looks more like a photograph than a black band). uint8 or float, N x C x H x W."""
    n, _, h, w = images.shape
    padded = F.pad(images.float(), (shift,) * 4, mode="reflect").to(images.dtype)
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).to(images.device)
    rows = torch.arange(h, device=images.device) + offsets[:, :1]  # N x H
    cols = torch.arange(w, device=images.device) + offsets[:, 1:]  # N x W
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class AlternatingFlipBatches(EpochCountingBatches):
    """Training batches with airbench's *alternating* flip, then a random translation of up to `shift` px.

    A random flip shows some images the same way round several epochs in a row. Here each image draws a coin
    once; it is shown flipped in the epochs where (coin XOR epoch is odd), so it alternates: over any two
    consecutive epochs the network sees every image both ways (Jordan 2024, section 3.6: worth about as much as
    a 10-25% longer run at these short schedules). The epoch count is part of the state that --resume restores.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, shift: int,
                 transform):
        super().__init__(images, labels, batch_size, shuffle=True, seed=seed, drop_last=True, transform=transform)
        self.shift = shift
        self.coin = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed + 1)) < 0.5

    def __iter__(self):
        flipped = (self.coin ^ bool(self.start_epoch() % 2)).to(self.inputs.device)
        order = self._indices().to(self.inputs.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.inputs[idx]
            x = torch.where(flipped[idx].view(-1, 1, 1, 1), x.flip(-1), x)
            x = translate(x, self.shift, self.generator)
            yield self.transform(x), self.labels[idx]


def random_flip_translate(images: torch.Tensor, shift: int = CifarNetRecipe.translate) -> torch.Tensor:
    """A random flip per image, then a random translation: what `run.py bench` times for this member (the same
    work per batch as AlternatingFlipBatches, without its epoch count)."""
    flipped = torch.rand(len(images), device=images.device) < 0.5
    return translate(torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images), shift)


def bench_settings(batch_size: int) -> dict:
    """What `run.py bench` times for this member, as fields of its Recipe (common/runner/bench_recipes.py): 32 px,
    every layer trained from scratch, flip + translate, SGD and airbench's label smoothing."""
    return dict(img_size=32, batch_size=batch_size, trainable="all (from scratch)",
                augmentation="alternating flip + translate", optimizer="sgd", lr=0.1, weight_decay=5e-4,
                augment=random_flip_translate,
                loss_fn=nn.CrossEntropyLoss(label_smoothing=CifarNetRecipe.label_smoothing))


# ----------------------------------------------------------------------------------------------------------
#                        Optimizer: Nesterov SGD with lookahead, warm-up then decay


class LookaheadSGD(torch.optim.SGD):
    """Nesterov SGD whose weights are pulled back toward a slow average every few steps (lookahead, Zhang et al.
    2019, "Lookahead Optimizer: k steps forward, 1 step back"), as airbench does it.

    Every `every` steps: slow <- slow + (1 - decay) * (fast - slow), then fast <- slow. `decay` grows from 0 to
    0.95^5 as the cube of training progress, so averaging is off early (the weights move fast and should) and
    strongest at the end, where it smooths out the noise of the last steps like an EMA; at the last step the
    network takes the slow weights. Covers every float tensor of the model's state (BatchNorm statistics too).
    The slow weights and the step count are in state_dict(), so --resume continues bit for bit.
    """

    def __init__(self, model: nn.Module, param_groups: list[dict], total_steps: int, every: int, momentum: float):
        super().__init__(param_groups, momentum=momentum, nesterov=True)
        self.model, self.total_steps, self.every, self.steps = model, total_steps, every, 0
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        last = self.steps >= self.total_steps
        if self.steps % self.every == 0 or last:
            decay = 1.0 if last else 0.95**5 * (self.steps / self.total_steps) ** 3
            for name, value in self.model.state_dict().items():
                if name in self.slow:
                    self.slow[name].lerp_(value, 1 - decay)
                    value.copy_(self.slow[name])
        return loss

    def state_dict(self) -> dict:
        return dict(super().state_dict(), lookahead=dict(steps=self.steps, slow=self.slow))

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        lookahead = state_dict.pop("lookahead")
        super().load_state_dict(state_dict)
        self.steps = lookahead["steps"]
        for name, value in lookahead["slow"].items():
            self.slow[name].copy_(value)


def make_optimizer(model: CifarNet, recipe: CifarNetRecipe, total_steps: int) -> LookaheadSGD:
    """airbench's decoupled hyperparameters -> PyTorch's SGD, for a loss averaged over the batch.

    With Nesterov momentum m, constant gradients make steps 1 + 1/(1 - m) times the gradient; dividing by that
    keeps the step size equal to `lr` whatever m. PyTorch's weight decay is multiplied by the learning rate:
    dividing by it keeps the decay per step equal to `weight_decay`, whatever the learning rate (and the
    64x faster BatchNorm biases do not decay 64x faster)."""
    per_image = 1024 * (1 + 1 / (1 - recipe.momentum))
    lr = recipe.lr / per_image * recipe.batch_size  # x batch size: our loss is a mean over the batch, not a sum
    decay = recipe.weight_decay / per_image * recipe.batch_size
    biases = [p for name, p in model.named_parameters() if "norm" in name and p.requires_grad]
    others = [p for name, p in model.named_parameters() if "norm" not in name and p.requires_grad]
    lr_biases = lr * recipe.bias_scaler
    groups = [dict(params=others, lr=lr, weight_decay=decay / lr),  # first: the "lr" that progress lines show
              dict(params=biases, lr=lr_biases, weight_decay=decay / lr_biases)]
    return LookaheadSGD(model, groups, total_steps, recipe.lookahead_every, recipe.momentum)


def warmup_then_decay(optimizer, total_steps: int, recipe: CifarNetRecipe):
    """Linear from 0.2x to 1x over the first 23% of the steps, then linear down to 0.07x: a short schedule
    spends most of its steps at a high rate and ends low, where the lookahead average settles."""
    warm = max(1, int(recipe.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return 0.2 + 0.8 * step / warm
        return 1.0 + (recipe.final_lr - 1.0) * (step - warm) / max(1, total_steps - warm)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------------
#                                    Training: the whole recipe, in fit()


def train(model: CifarNet, images: dict, recipe: CifarNetRecipe, eval_batch_size: int, *, seed: int, compile: bool,
          device: torch.device, precision, display, history: list, checkpoint=None, on_epoch_end=None):
    """Train `model` from scratch with airbench's recipe: whitened first layer, alternating flip + translation,
    label smoothing, Nesterov SGD with lookahead, warm-up then decay. `images`: {"train": (images, labels),
    "val": (...)}, uint8 at 32x32 on the device. Returns common.training.fit's result (checkpoints and
    --resume included)."""
    mean, std = normalization(model)
    to_input = lambda b: model_input(b, 32, mean, std)  # noqa: E731
    train_images = images["train"][0]
    # whitening from 5,000 training images spread evenly over the split: the split is stored class by class, so
    # its first 5,000 would be airplanes and cars only (--resume then loads the saved, identical layer)
    every = max(1, len(train_images) // recipe.whiten_images)
    init_whitening(model, to_input(train_images[::every][:recipe.whiten_images]).float())
    train_batches = AlternatingFlipBatches(*images["train"], recipe.batch_size, seed=seed, shift=recipe.translate,
                                           transform=to_input)
    if len(train_batches) == 0:
        raise SetupError(f"--train-size {len(images['train'][1])} is smaller than one batch of "
                         f"--cifarnet-batch-size {recipe.batch_size}.")
    val_batches = TensorBatches(*images["val"], eval_batch_size, transform=to_input)
    steps = recipe.epochs * len(train_batches)
    optimizer = make_optimizer(model, recipe, steps)
    return fit(model, train_batches, val_batches, epochs=recipe.epochs, optimizer=optimizer,
               scheduler=warmup_then_decay(optimizer, steps, recipe),
               loss_fn=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing), device=device,
               precision=precision, display=display, history=history, checkpoint=checkpoint,
               on_epoch_end=on_epoch_end, compile=compile)
