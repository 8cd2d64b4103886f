"""ABD-Net ("Attentive but Diverse", Chen et al., ICCV 2019) as a FastReID-style backbone.

Layout (official code, VITA-Group/ABD-Net, ``--shallow-cam --abd-dan cam pam --abd-np 2``):

* ResNet (default 50) with last stride 1; shallow CAM (gamma 0) on ``layer1``'s output;
* two branches after ``layer3``, each with its own copy of ``layer4``:
  - global: GAP -> FC width->1024 -> BN -> ReLU -> dropout 0.5;
  - attentive: 1x1 conv width->1024 (BN, ReLU) -> 2 horizontal stripes -> per stripe the sum
    of three heads {identity, CAM, PAM} (:class:`.attention.AttentionHead`) -> dropout 0.1 +
    1x1 conv 1024->1024 -> GAP;
* output: ``concat(global, stripe_1, stripe_2)`` = 3072 values, returned as a ``(B, 3072, 1, 1)``
  map so a FastReID head can pool it like any backbone map.

Deviations from the official code:

* the official model trains one classifier (and a triplet loss) per 1024-d part; here the 3072-d
  concatenation goes to the plugin's single head;
* stripes use ``torch.tensor_split`` (equal when the map height divides, as at 384x128);
* O.W. covers every backbone conv by default (``ow_layers="all"``, the regulariser as described);
  the official code walks only ``nn.Sequential`` children and so only ever reaches the stem conv
  (``ow_layers="stem"`` reproduces that). The difference is large: on a randomly initialised
  ResNet-50 O.W. is about 36 over all 63 convs and about 5e-4 on the stem alone;
* eigenvalue extremes use ``power_iters`` steps (default 10, about 90 % of the exact spread on
  ResNet-50 convs) where the official code takes one (about 45 %); the Gram of the smaller side
  is used (see :mod:`.orthogonality`);
* the official recipe first trains only the classifiers for 10 epochs ("fixbase") without any
  regulariser; that schedule belongs to the trainer, not to this module.

Regularisers (:mod:`.orthogonality`): ``regularization_losses()`` returns ``loss_ow`` (O.W., from
the current weights) and, from epoch ``of_start_epoch`` on, ``loss_of`` (O.F. of the last
training forward: the identity/CAM/PAM head outputs and the fused map of both stripes, each
position averaged over stripes, plus the shallow-CAM map at ``of_intermediate_scale``).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .attention import AttentionHead, ChannelAttention, conv_bn_relu
from .orthogonality import feature_orthogonality, weight_orthogonality
from .pretrained import LoadReport, load_pretrained_weights
from .resnet_body import build_resnet_body, parse_depth, stage_channels

HEAD_KINDS = ("identity", "cam", "pam")
# O.F. positions of the official code: head outputs ("before" = identity head) and fused map
OF_POSITIONS = ("before", "cam", "pam", "after")


def _init_new_layers(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


class ABDNet(nn.Module):
    """ABD-Net backbone returning ``(B, global_dim + num_stripes * part_dim, 1, 1)``."""

    def __init__(
        self,
        depth: Union[int, str] = 50,
        last_stride: int = 1,
        global_dim: int = 1024,
        part_dim: int = 1024,
        num_stripes: int = 2,
        dropout: float = 0.5,
        shallow_cam: bool = True,
        ow_beta: float = 1e-3,
        ow_layers: str = "all",
        of_scale: float = 1e-6,
        of_intermediate_scale: float = 0.01,
        of_start_epoch: int = 23,
        power_iters: int = 10,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__()
        if ow_layers not in ("all", "stem"):
            raise ValueError(f"ow_layers must be 'all' or 'stem', got {ow_layers!r}")
        if num_stripes < 1:
            raise ValueError(f"num_stripes must be >= 1, got {num_stripes}")
        self.depth = parse_depth(depth)
        body = build_resnet_body(self.depth, last_stride, norm_layer=norm_layer)
        width = stage_channels(body)[-1]
        # shared trunk, torchvision names
        self.conv1, self.bn1 = body.conv1, body.bn1
        self.relu, self.maxpool = body.relu, body.maxpool
        self.layer1, self.layer2, self.layer3 = body.layer1, body.layer2, body.layer3
        self.shallow_cam = ChannelAttention() if shallow_cam else nn.Identity()
        # global branch
        self.global_layer4 = body.layer4
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.global_fc = nn.Sequential(
            nn.Linear(width, global_dim), nn.BatchNorm1d(global_dim), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        # attentive branch
        self.part_layer4 = copy.deepcopy(body.layer4)
        self.part_reduction = conv_bn_relu(width, part_dim, 1)
        self.part_heads = nn.ModuleDict({k: AttentionHead(part_dim, k) for k in HEAD_KINDS})
        self.part_fuse = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(part_dim, part_dim, 1))
        self.part_pool = nn.AdaptiveAvgPool2d(1)
        for new in (self.global_fc, self.part_reduction, self.part_heads, self.part_fuse):
            _init_new_layers(new)

        self.num_stripes = num_stripes
        self.out_channels = global_dim + num_stripes * part_dim
        self.ow_beta, self.ow_layers = ow_beta, ow_layers
        self.of_scale, self.of_intermediate_scale = of_scale, of_intermediate_scale
        self.of_start_epoch, self.power_iters = of_start_epoch, power_iters
        self.epoch = 0
        self._feature_penalty: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        intermediate = x = self.shallow_cam(self.layer1(x))
        x = self.layer3(self.layer2(x))

        global_feat = self.global_fc(self.global_pool(self.global_layer4(x)).flatten(1))

        parts = self.part_reduction(self.part_layer4(x))
        if parts.shape[2] < self.num_stripes:
            raise ValueError(
                f"feature map height {parts.shape[2]} < {self.num_stripes} stripes; "
                "use a taller input image")
        fmaps: Dict[str, List[torch.Tensor]] = {k: [] for k in OF_POSITIONS}
        part_feats = []
        for stripe in torch.tensor_split(parts, self.num_stripes, dim=2):
            heads = [self.part_heads[k](stripe) for k in HEAD_KINDS]
            fused = self.part_fuse(heads[0] + heads[1] + heads[2])
            for key, fmap in zip(OF_POSITIONS, heads + [fused]):
                fmaps[key].append(fmap)
            part_feats.append(self.part_pool(fused).flatten(1))

        self._feature_penalty = (
            self._feature_orthogonality(fmaps, intermediate) if self._of_active() else None)
        return torch.cat([global_feat] + part_feats, dim=1)[:, :, None, None]

    # ------------------------------------------------------------------ regularisers
    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every epoch (O.F. starts at ``of_start_epoch``)."""
        self.epoch = int(epoch)

    def _of_active(self) -> bool:
        return (self.training and torch.is_grad_enabled() and self.of_scale > 0
                and self.epoch >= self.of_start_epoch)

    def _feature_orthogonality(self, fmaps: Dict[str, List[torch.Tensor]],
                               intermediate: torch.Tensor) -> torch.Tensor:
        total = feature_orthogonality([intermediate], self.of_scale * self.of_intermediate_scale,
                                      self.power_iters)
        for key in OF_POSITIONS:
            total = total + feature_orthogonality(fmaps[key], self.of_scale, self.power_iters)
        return total

    def ow_modules(self) -> List[nn.Module]:
        """Modules whose convs O.W. regularises (ResNet convs only, not the attention heads)."""
        if self.ow_layers == "stem":
            return [self.conv1]
        return [self.conv1, self.layer1, self.layer2, self.layer3,
                self.global_layer4, self.part_layer4]

    def regularization_losses(self) -> Dict[str, torch.Tensor]:
        """``loss_ow`` and (when active) ``loss_of``; empty in eval mode."""
        if not self.training:
            return {}
        losses: Dict[str, torch.Tensor] = {}
        if self.ow_beta > 0:
            losses["loss_ow"] = weight_orthogonality(self.ow_modules(), self.ow_beta,
                                                     self.power_iters)
        if self._feature_penalty is not None:
            losses["loss_of"] = self._feature_penalty
        return losses

    # ------------------------------------------------------------------ weights
    @staticmethod
    def remap_pretrained_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """ImageNet ``layer4.*`` initialises both branch copies of ``layer4``."""
        remapped = {}
        for key, value in state.items():
            if key.startswith("layer4."):
                rest = key[len("layer4."):]
                remapped["global_layer4." + rest] = value
                remapped["part_layer4." + rest] = value.clone()
            else:
                remapped[key] = value
        return remapped

    def load_pretrained(self, path: str) -> LoadReport:
        """Load a local torchvision ImageNet ResNet state dict (see :mod:`.pretrained`)."""
        return load_pretrained_weights(self, path)
