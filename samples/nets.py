"""Small CNNs for the onnxcut samples: two classifiers (32x32) and three segmenters (64x64),
plus a wide segmenter (DeepLabWide, ResNet-18 widths) that benchmarks/ builds on demand.

Each architecture exercises a different graph pattern for model surgery: Concat skips with
unfolded BatchNormalization (UNet), residual Adds and dilated parallel branches (DeepLab),
global pooling into Gemm (ResNet), Flatten into Gemm (VGG), and depthwise convs with
squeeze-excitation Mul gates and HardSwish (MobileNet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_SEG_CLASSES = 11  # background + digits 0..9
NUM_CLS_CLASSES = 10


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
    )


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1):
    return nn.Sequential(*conv_bn(cin, cout, k, stride, dilation), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection on the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride, dilation)
        self.conv2 = conv_bn(cout, cout, 3, 1, dilation)
        self.shortcut = (
            nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class UNet(nn.Module):
    """VGG-style encoder (conv-BN-ReLU pairs + MaxPool), ConvTranspose decoder, Concat skips.

    Logits from the first (stride 4) decoder stage are upsampled and added to the full-resolution
    head. Without that shortcut the full-resolution skip explains background/foreground early and
    the network sits on that plateau for hundreds of steps before learning which digit it is.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96)) -> None:
        super().__init__()
        self.enc = nn.ModuleList()
        cin = 3
        for w in widths:
            self.enc.append(nn.Sequential(conv_bn_relu(cin, w), conv_bn_relu(w, w)))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            # BN after upsampling keeps the deep features on the same scale as the skip.
            self.up.append(
                nn.Sequential(
                    nn.ConvTranspose2d(cin, w, 2, stride=2, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                )
            )
            self.dec.append(nn.Sequential(conv_bn_relu(2 * w, w), conv_bn_relu(w, w)))
            cin = w
        self.deep_head = nn.Conv2d(widths[-2], NUM_SEG_CLASSES, 1)
        self.deep_scale = 2 ** (len(widths) - 2)
        self.head = nn.Conv2d(cin, NUM_SEG_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.enc):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        deep = None
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
            if deep is None:
                deep = F.interpolate(
                    self.deep_head(x),
                    scale_factor=self.deep_scale,
                    mode="bilinear",
                    align_corners=False,
                )
        return self.head(x) + deep


class ASPP(nn.Module):
    """Parallel 1x1 and dilated 3x3 branches, concatenated and projected with a 1x1 conv."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        branches = [conv_bn_relu(cin, cout, 1)]
        branches += [conv_bn_relu(cin, cout, 3, dilation=r) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(cout * len(branches), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLab(nn.Module):
    """Residual backbone (output stride 4), ASPP, classifier, bilinear upsampling to input."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            conv_bn_relu(3, 16),
            BasicBlock(16, 16),
            BasicBlock(16, 32, stride=2),
            BasicBlock(32, 48, stride=2),
            BasicBlock(48, 48, dilation=2),
        )
        self.aspp = ASPP(48, 48)
        self.classifier = nn.Sequential(conv_bn_relu(48, 48), nn.Conv2d(48, NUM_SEG_CLASSES, 1))
        self.output_stride = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(self.aspp(self.backbone(x)))
        # A constant scale factor keeps the exported Resize free of Shape arithmetic.
        return F.interpolate(
            x, scale_factor=self.output_stride, mode="bilinear", align_corners=False
        )


class SqueezeExcite(nn.Module):
    """Channel gate: GlobalAveragePool -> 1x1 -> ReLU -> 1x1 -> HardSigmoid -> Mul."""

    def __init__(self, c: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, c // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.hardsigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * gate


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 (groups=C) -> SE -> pointwise 1x1, with HardSwish activations."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.dw = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, dilation, dilation=dilation, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.Hardswish(),
        )
        self.se = SqueezeExcite(cin)
        self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.Hardswish()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(self.se(self.dw(x)))
        return self.act(y + x if self.residual else y)


class MobileNetSeg(nn.Module):
    """MobileNetV3-flavoured segmenter with an LR-ASPP-like head: deep logits (stride 4)
    upsampled and added to logits from stride-2 features, then upsampled to the input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        self.low = nn.Sequential(DepthwiseSeparable(16, 24), DepthwiseSeparable(24, 24))
        self.high = nn.Sequential(
            DepthwiseSeparable(24, 48, stride=2),
            DepthwiseSeparable(48, 48, dilation=2),
            DepthwiseSeparable(48, 64, dilation=4),
            DepthwiseSeparable(64, 64, dilation=2),
        )
        self.high_head = nn.Conv2d(64, NUM_SEG_CLASSES, 1)
        self.low_head = nn.Conv2d(24, NUM_SEG_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(self.stem(x))
        high = self.high_head(self.high(low))
        up = F.interpolate(high, scale_factor=2, mode="bilinear", align_corners=False)
        logits = up + self.low_head(low)
        return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)


class ResNetCls(nn.Module):
    """Residual classifier: stages at 32/16/8 px, GlobalAveragePool -> Flatten -> Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, 16),
            BasicBlock(16, 16),
            BasicBlock(16, 32, stride=2),
            BasicBlock(32, 64, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, NUM_CLS_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class VGGCls(nn.Module):
    """Plain conv stack with MaxPool, Flatten -> Gemm -> Relu -> Gemm."""

    def __init__(self, cfg: tuple = (32, 32, "M", 64, 64, "M", 64, "M")) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn_relu(cin, v))
                cin = v
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(cin * 4 * 4, 128)
        self.fc2 = nn.Linear(128, NUM_CLS_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


class DeepLabWide(nn.Module):
    """DeepLab with ResNet-18 stage widths (64/128/256, two basic blocks each): about 4 M
    parameters, where the other samples have 0.2 M, to show where channels are redundant.

    A stride-2 stem keeps the 64-channel stage at 32 px; the 256-channel stage and ASPP run at
    output stride 8 (ResNet-18's 512-channel stage is left out: 8x8 features have no room for
    it). As in DeepLabv3+, a decoder joins the ASPP output, upsampled x2, with the stride-4
    features: at stride 8 alone the bilinear upsampling blurs the 3 px strokes (val mIoU 0.54).
    """

    def __init__(
        self, widths: tuple[int, int, int] = (64, 128, 256), aspp: int = 128, low: int = 48
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.low_level = nn.Sequential(
            conv_bn_relu(3, w1, stride=2),
            BasicBlock(w1, w1),
            BasicBlock(w1, w1),
            BasicBlock(w1, w2, stride=2),
            BasicBlock(w2, w2),
        )
        self.high_level = nn.Sequential(BasicBlock(w2, w3, stride=2), BasicBlock(w3, w3))
        self.aspp = ASPP(w3, aspp)
        self.reduce = conv_bn_relu(w2, low, 1)
        self.classifier = nn.Sequential(
            conv_bn_relu(aspp + low, aspp), nn.Conv2d(aspp, NUM_SEG_CLASSES, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low_level(x)  # stride 4
        high = self.aspp(self.high_level(low))  # stride 8
        # Constant scale factors keep the exported Resizes free of Shape arithmetic.
        up = F.interpolate(high, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.classifier(torch.cat([up, self.reduce(low)], dim=1))
        return F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
