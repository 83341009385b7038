"""Backbones: uint8 images in, a region feature map [B, C, H, W] out. A registry, keyed by name.

Each backbone normalises its own input (it knows the statistics it was trained with) and says
whether it is trainable. `vgg19` is LESA's frozen conv5_4 (14x14x512 at 224); `small_cnn` is a
trainable four-layer CNN sized so the synthetic demo trains in minutes on two CPU cores, and
`small_cnn_frozen` the same network frozen with the weights of an earlier run; `clip` is CLIP's
image tower from a Hugging Face checkpoint folder, its projected patch tokens as the regions
(docs/backbones.md), frozen unless model.freeze_backbone is false.

A frozen backbone's output can be cached once (`lesa extract`, a dataset of kind "feature");
training and evaluation on such a dataset put `FeatureInput` in the backbone's place, chosen by
`build_backbone` from the dataset, so the head sees the same map either way.
"""

from __future__ import annotations

import math

import fsspec
import torch
from torch import nn

from datasets.contract import DatasetError, FeatureSpec
from datasets.makers.clip_folder import CLIP_MEAN, CLIP_STD, check_clip_folder, image_statistics, load_clip_model
from trainer.config import ConfigError, ModelConfig
from trainer.weights import read_state_dict


class Backbone(nn.Module):
    name: str
    out_channels: int
    trainable: bool
    either: bool = False  # whether model.freeze_backbone may choose (only `clip`); else it is `trainable`'s way
    resample: str = "bilinear"  # the filter the stream resizes its images with (datasets/stream.py, RESAMPLING)
    shape_from_weights: bool = False  # the architecture is read from the weights (clip: config.json)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self):
        super().__init__()
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> [B, 3, H, W] in the backbone's input statistics and weight dtype.

        Computed in float32 (bf16 cannot hold 255 - 123.68 exactly), then cast. The permuted
        view of HWC images is already channels_last in memory, which convolutions prefer."""
        x = images.permute(0, 3, 1, 2).float()
        x = (x - self._mean.float()) / self._std.float()
        return x.to(next(self.parameters()).dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalise(images))

    def freeze(self, weights: str | None) -> None:
        """A frozen backbone: pretrained weights (when given), no gradients, always in inference
        mode (BatchNorm keeps the statistics it was trained with)."""
        if weights is not None:
            self.load_weights(weights)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()  # a module starts in training mode, and train() may never be called

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)

    def load_weights(self, url: str) -> None:
        """`features.*` from a state dict: torchvision's key names, or `backbone.features.*` of a
        model.pt that `lesa train` wrote (tensors only, trainer/weights.py)."""
        state = read_state_dict(url)
        mine = {
            key.removeprefix("backbone.").removeprefix("features."): value
            for key, value in state.items()
            if key.startswith(("features.", "backbone.features."))
        }
        own = self.features.state_dict()
        missing = sorted(set(own) - set(mine))
        if missing:
            raise ValueError(f"{url}: not a {self.name} state dict (missing features.{missing[0]} ...)")
        try:
            self.features.load_state_dict({k: mine[k] for k in own})
        except RuntimeError as exc:
            raise ValueError(f"{url}: not a {self.name} state dict ({str(exc).splitlines()[-1].strip()})") from None

    @classmethod
    def from_config(cls, model_cfg: ModelConfig) -> Backbone:
        """A trainable backbone starts from its random init; a frozen one from its weights. (Whether
        the weights exist is checked before any cluster work: launch/preflight.py.)"""
        if cls.trainable:
            return cls()
        if model_cfg.backbone_weights is None:
            raise ConfigError(needs_weights(model_cfg, "the input"))
        return cls(model_cfg.backbone_weights)


def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(Backbone):
    """96x96 -> 12x12 regions (three stride-2 stages), 128 channels."""

    name = "small_cnn"
    out_channels = 128
    trainable = True
    mean = (127.5, 127.5, 127.5)
    std = (64.0, 64.0, 64.0)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(3, 32, 2),
            *conv_bn_relu(32, 64, 2),
            *conv_bn_relu(64, 64, 1),
            *conv_bn_relu(64, 128, 2),
        )


class FrozenSmallCNN(SmallCNN):
    """`small_cnn` with the weights of an earlier run's model.pt, frozen: the synthetic analogue of
    LESA's protocol, where every method is a head on the same frozen, pretrained features
    (docs/protocol.md, Backbone), so a comparison measures the heads and not how each trained its backbone."""

    name = "small_cnn_frozen"
    trainable = False

    def __init__(self, weights: str | None):
        with torch.random.fork_rng(devices=[]):  # as VGG19Conv54: the head's init does not depend on it
            super().__init__()
        self.freeze(weights)


VGG19_LAYERS = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
]  # ends at conv5_4 + ReLU: LESA drops pool5


class VGG19Conv54(Backbone):
    """Frozen VGG-19 up to conv5_4/ReLU: 224x224 -> 14x14x512 regions (docs/protocol.md, Backbone).

    Weights are a state dict with torchvision's `features.N.*` names (other keys are ignored),
    read from a local path or any fsspec URL the user gives; nothing is downloaded implicitly.
    Statistics are slim's RGB means with no std division, as the official extractor.
    """

    name = "vgg19"
    out_channels = 512
    trainable = False
    mean = (123.68, 116.78, 103.94)
    std = (1.0, 1.0, 1.0)

    def __init__(self, weights: str | None):
        super().__init__()
        layers, cin = [], 3
        # The random init is overwritten by the weights; drawing it from a forked RNG leaves the
        # global stream as it was, so the head is initialised the same whether this backbone runs
        # or its cached features stand in for it (FeatureInput).
        with torch.random.fork_rng(devices=[]):
            for item in VGG19_LAYERS:
                if item == "M":
                    layers.append(nn.MaxPool2d(2, 2))
                else:
                    layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU(inplace=True)]
                    cin = item
        self.features = nn.Sequential(*layers)
        self.freeze(weights)


class ClipVision(Backbone):
    """CLIP's image tower (datasets/makers/clip_folder.py: a CLIPModel folder, offline). Regions: the
    patch tokens after the final layer norm, projected into the joint image-text space (ViT-B/16 at
    224: 14x14 regions of 512, r = row * w + col as the patches lie); `class_token=True` gives the
    class token's projection instead as a 1x1 map, CLIP's own image embedding (clip_zeroshot).
    Input statistics: the folder's preprocessor_config.json, else CLIP's. Frozen unless
    model.freeze_backbone is false; trained, model.activation_checkpointing recomputes each
    encoder layer in backward instead of keeping its activations."""

    name = "clip"
    trainable = False  # the default; an instance built with train=True is trained
    either = True
    resample = "bicubic"  # CLIP's image processor: bicubic short-side resize, then a centre crop
    shape_from_weights = True  # ViT-B/32, B/16 or L/14: the folder's config.json says which
    mean = tuple(255 * m for m in CLIP_MEAN)  # normalise works on 0-255 pixels
    std = tuple(255 * s for s in CLIP_STD)

    def __init__(self, weights: str, train: bool = False, checkpointing: bool = False, class_token: bool = False):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # as VGG19Conv54: the head's init does not depend on it
            clip, folder = load_clip_model(weights)
        mean, std = image_statistics(folder)
        self._mean.copy_(255 * torch.tensor(mean).view(1, 3, 1, 1))
        self._std.copy_(255 * torch.tensor(std).view(1, 3, 1, 1))
        if train and checkpointing:
            clip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.tower, self.projection = clip.vision_model, clip.visual_projection  # the text tower is dropped
        self.image_size, self.out_channels = clip.config.vision_config.image_size, clip.config.projection_dim
        self.class_token, self.trainable = class_token, train
        if not train:
            self.freeze(None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalise(images)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"clip: images of {list(x.shape[-2:])}, the tower takes {self.image_size}")
        tokens = self.projection(self.tower.post_layernorm(self.tower(pixel_values=x).last_hidden_state))
        if self.class_token:
            return tokens[:, 0, :, None, None]
        b, r, c = tokens.shape
        side = math.isqrt(r - 1)
        return tokens[:, 1:].transpose(1, 2).reshape(b, c, side, side)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, class_token: bool = False) -> ClipVision:
        if model_cfg.backbone_weights is None:
            raise ConfigError(needs_weights(model_cfg, "the input"))
        train = model_cfg.freeze_backbone is False
        return cls(model_cfg.backbone_weights, train, model_cfg.activation_checkpointing, class_token)

    @staticmethod
    def joint_dim(weights: str) -> int:
        """The joint image-text space's size, from the folder's config.json (preflight checked it)."""
        return int(check_clip_folder(weights).get("projection_dim", 512))

    @staticmethod
    def check_folder(model_cfg: ModelConfig, image_size: int) -> None:
        """The weights are a CLIP folder whose tower takes data.image_size (its position embeddings
        are for one size): config.json is read, the weights are not."""
        try:
            vision = check_clip_folder(model_cfg.backbone_weights).get("vision_config") or {}
        except DatasetError as exc:
            raise ConfigError(f"model.backbone_weights: {exc}") from None
        size = int(vision.get("image_size", 224))
        if size != image_size:
            raise ConfigError(
                f"data.image_size: {image_size}, but the CLIP tower at {model_cfg.backbone_weights} takes "
                f"{size} px images; set data.image_size={size}"
            )


class FeatureInput(nn.Module):
    """Stands in for a frozen backbone when the dataset holds its cached output: float16 rows
    [B, R, C] in, the map [B, C, h, w] the backbone would have produced out (r = row * w + col)."""

    trainable = False

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.out_channels = spec.channels
        # No parameters, but the head may run in bf16 (DeepSpeed casts modules): this empty buffer
        # follows the model's dtype and device, so the map comes out in what the head expects.
        self.register_buffer("_like", torch.empty(0), persistent=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        (h, w), (b, r, c) = self.spec.grid, rows.shape
        if (r, c) != self.spec.shape:
            raise ValueError(f"feature rows {list(rows.shape[1:])}, expected {list(self.spec.shape)}")
        return rows.to(self._like.dtype).transpose(1, 2).reshape(b, c, h, w)


BACKBONES: dict[str, type[Backbone]] = {b.name: b for b in (SmallCNN, FrozenSmallCNN, VGG19Conv54, ClipVision)}


def input_resample(model_cfg: ModelConfig) -> str:
    """The resize filter of the config's backbone, for every StreamSpec and `lesa predict` that feed it."""
    return BACKBONES[model_cfg.backbone].resample


def trains_backbone(model_cfg: ModelConfig) -> bool:
    """Whether the config's backbone is trained: model.freeze_backbone, else the backbone's own way."""
    default = BACKBONES[model_cfg.backbone].trainable
    return default if model_cfg.freeze_backbone is None else not model_cfg.freeze_backbone


def needs_weights(model_cfg: ModelConfig, where: str) -> str:
    return (
        f"model.backbone_weights: {where} holds images and {model_cfg.backbone} is frozen, so it "
        f"needs pretrained weights: a state dict path or URL, for clip a CLIP checkpoint folder "
        f"(or train on the feature dataset `lesa extract` makes, which needs none)"
    )


def check_weights(model_cfg: ModelConfig, where: str, image_size: int) -> None:
    """A frozen backbone that runs on images needs pretrained weights; untrained it would give
    noise. (On a feature dataset it does not run at all, so nothing is needed there.) `clip` always
    starts from its weights, trained or not."""
    weights, backbone = model_cfg.backbone_weights, BACKBONES[model_cfg.backbone]
    if not backbone.either and model_cfg.freeze_backbone not in (None, not backbone.trainable):
        way = "trained (small_cnn_frozen is the frozen one)" if backbone.trainable else "frozen"
        raise ConfigError(f"model.freeze_backbone: {backbone.name} is always {way}; leave the key unset")
    if backbone.trainable:
        return
    if weights is None:
        raise ConfigError(needs_weights(model_cfg, where))
    fs, path = fsspec.core.url_to_fs(weights)
    if not fs.exists(path):  # said here, before every worker fails on it
        raise ConfigError(f"model.backbone_weights: {weights} does not exist")
    if backbone is ClipVision:
        ClipVision.check_folder(model_cfg, image_size)


def check_features(model_cfg: ModelConfig, image_size: int, spec: FeatureSpec, where: str) -> None:
    """A feature dataset can stand in only for the backbone, at the image size, it was made with,
    and only frozen: cached regions cannot be fine-tuned."""
    if spec.backbone != model_cfg.backbone:
        raise ConfigError(
            f"model.backbone: {where} holds features of {spec.backbone!r}, but the config asks "
            f"for {model_cfg.backbone!r}; set model.backbone={spec.backbone} or train on images"
        )
    if spec.image_size != image_size:
        raise ConfigError(
            f"data.image_size: {where} holds features of images at {spec.image_size}, "
            f"but the config says {image_size}; set data.image_size={spec.image_size}"
        )
    if trains_backbone(model_cfg):
        raise ConfigError(
            f"model.freeze_backbone: {where} holds cached features of a frozen {spec.backbone}, which a "
            f"trained backbone cannot use; train on the image dataset, or leave model.freeze_backbone unset"
        )


def build_backbone(model_cfg: ModelConfig, features: FeatureSpec | None = None, class_token: bool = False) -> nn.Module:
    """The config's backbone, or FeatureInput in its place when `features` (the FeatureSpec of a
    feature dataset, already checked with `check_features`) says the inputs are its output.
    `class_token`: CLIP's image embedding instead of its regions (clip_zeroshot; preflight checked)."""
    if class_token:
        return ClipVision.from_config(model_cfg, class_token=True)
    if features is not None:
        return FeatureInput(features)
    return BACKBONES[model_cfg.backbone].from_config(model_cfg)
