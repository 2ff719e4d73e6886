"""Grad-CAM (Selvaraju et al., 2017): where in the image a CNN's prediction comes from.

For one image, one class c and a convolutional feature map A (C channels x h x w positions) that the
prediction is computed from:

    weights   alpha_k = mean over the h x w positions of  d score_c / d A_k     (how much channel k raises c)
    map       ReLU( sum_k alpha_k * A_k )                                          (h x w, where c's evidence is)

The map has the feature map's resolution (7 x 7 for a ResNet50 at 224 px, 2 x 2 for any stride-32 CNN at
64 px), so it is coarse by construction; it is upsampled to the image and scaled to [0, 1] for display.

A forward hook on `layer` catches A and hands the rest of the network a detached copy that requires grad:
the gradient then stops at A, so it is found even when everything before the layer is frozen, and nothing
is computed for the layers before it. Written here by hand rather than taken from the `grad-cam` package:
docs/predict.md says why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grad_cam(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, classes: torch.Tensor | None = None,
             size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (maps N x h x w in [0, 1], logits N x classes), both float32 on the CPU.

    `inputs` is the model's input batch; `classes` the class to explain per image (default: the predicted
    one); `size` upsamples the maps to size x size (bilinear). The model runs in eval mode, in fp32.
    """
    caught = {}

    def hook(module, args, output):
        caught["maps"] = output.detach().float().requires_grad_()
        return caught["maps"]

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(inputs).float()
            classes = logits.argmax(1) if classes is None else classes.to(logits.device)
            # each image's score depends only on its own feature map (eval mode), so one backward serves all
            (grads,) = torch.autograd.grad(logits.gather(1, classes.view(-1, 1)).sum(), caught["maps"])
    finally:
        handle.remove()
        model.train(was_training)
    maps = F.relu((grads.mean(dim=(2, 3), keepdim=True) * caught["maps"].detach()).sum(1))
    if size is not None:
        maps = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return maps.cpu(), logits.detach().cpu()
