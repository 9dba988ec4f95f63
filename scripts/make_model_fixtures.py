#!/usr/bin/env python3
"""Reference numbers and PyTorch fixtures for fpipe's backbones.

Re-creates, in PyTorch, the reference definitions that fpipe's candle models follow:
iresnet and MobileFaceNet as in insightface arcface_torch (`backbones/iresnet.py`,
`backbones/mobilefacenet.py`, same module tree and state-dict names), and VarGFaceNet from the
official MXNet symbol (`zma-c-137/VarGFaceNet/VarGFaceNet.py`, translated layer by layer).
Written for fpipe from those descriptions; `width` and `input_size` knobs are added the same way
as in the Rust models (width 1, input 112 = the reference).

Writes into stages/tests/fixtures/:
  reference_counts.json   parameters and conv+linear multiply-accumulates per image at full size
  iresnet_tiny.pth        state dict of a width-reduced iresnet18 (input 32)
  mbf_tiny.pth            state dict of a width-reduced MobileFaceNet (input 32)
  parity_tiny.pth         {input, iresnet_out, mbf_out}: eval-mode embeddings PyTorch computes

Run: .venv-peers/bin/python scripts/make_model_fixtures.py
"""
import json
import os

import torch
from torch import nn

OUT = os.path.join(os.path.dirname(__file__), "..", "stages", "tests", "fixtures")


def scaled(n, w, multiple=1):
    v = int(round(n * w / multiple)) * multiple
    return max(v, multiple)


# ----------------------------------------------------------------------------- iresnet
class IBlock(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (self.downsample(x) if self.downsample is not None else x)


IRESNET_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3],
                  100: [3, 13, 30, 3], 200: [6, 26, 60, 6]}


class IResNet(nn.Module):
    def __init__(self, depth, width=1.0, input_size=112, num_features=512):
        super().__init__()
        ch = [scaled(n, width) for n in (64, 64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch[0], eps=1e-5)
        self.prelu = nn.PReLU(ch[0])
        cin = ch[0]
        for i, n in enumerate(IRESNET_LAYERS[depth]):
            blocks = []
            for j in range(n):
                blocks.append(IBlock(cin, ch[i + 1], 2 if j == 0 else 1))
                cin = ch[i + 1]
            setattr(self, "layer%d" % (i + 1), nn.Sequential(*blocks))
        h = input_size
        for _ in range(4):
            h = (h + 1) // 2
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(cin * h * h, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


# ----------------------------------------------------------------------- MobileFaceNet
class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k=1, s=1, p=0, groups=1, act=True):
        super().__init__()
        mods = [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            mods.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, cin, cout, g, stride, residual):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, g), ConvBlock(g, g, 3, stride, 1, groups=g), ConvBlock(g, cout, act=False))

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class Residual(nn.Module):
    def __init__(self, c, n, g):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, g, 1, True) for _ in range(n)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, e, k, num_features):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(e, e, k, 1, 0, groups=e, act=False), nn.Flatten(),
            nn.Linear(e, num_features, bias=False), nn.BatchNorm1d(num_features))

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, blocks=(1, 4, 6, 2), scale=2, width=1.0, input_size=112, num_features=512):
        super().__init__()
        u = scaled(64, width)
        a, b = u * scale, 2 * u * scale
        layers = [ConvBlock(3, a, 3, 2, 1)]
        if blocks[0] == 1:
            layers.append(ConvBlock(a, a, 3, 1, 1, groups=u))
        else:
            layers.append(Residual(a, blocks[0], 2 * u))
        layers += [DepthWise(a, a, 2 * u, 2, False), Residual(a, blocks[1], 2 * u),
                   DepthWise(a, b, 4 * u, 2, False), Residual(b, blocks[2], 4 * u),
                   DepthWise(b, b, 8 * u, 2, False), Residual(b, blocks[3], 4 * u)]
        self.layers = nn.ModuleList(layers)
        self.conv_sep = ConvBlock(b, 8 * u)
        h = input_size
        for _ in range(4):
            h = (h + 1) // 2
        self.features = GDC(8 * u, h, num_features)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


# ------------------------------------------------------------------------- VarGFaceNet
class CBA(nn.Module):
    def __init__(self, cin, cout, k, s, p, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=2e-5, momentum=0.1)
        self.act = nn.PReLU(cout) if act else None

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.act(x) if self.act is not None else x


class Sep(nn.Module):
    """3x3 group conv (8 channels per group) cin -> cin*factor, BN, PReLU; 1x1 -> cout, BN."""

    def __init__(self, cin, cout, stride, factor, act):
        super().__init__()
        self.dw = CBA(cin, cin * factor, 3, stride, 1, groups=cin // 8)
        self.pw = CBA(cin * factor, cout, 1, 1, 0, act=act)

    def forward(self, x):
        return self.pw(self.dw(x))


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c // 4, 1)
        self.act = nn.PReLU(c // 4)
        self.conv2 = nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.conv2(self.act(self.conv1(s))))


class NormalBlock(nn.Module):
    def __init__(self, cin, cout, stride, factor, se):
        super().__init__()
        self.shortcut = Sep(cin, cout, stride, factor, False) if (stride != 1 or cin != cout) else None
        self.sep1 = Sep(cin, cout, stride, factor, True)
        self.sep2 = Sep(cout, cout, 1, factor, False)
        self.se = SE(cout) if se else None
        self.act = nn.PReLU(cout)

    def forward(self, x):
        y = self.sep2(self.sep1(x))
        if self.se is not None:
            y = self.se(y)
        return self.act(y + (self.shortcut(x) if self.shortcut is not None else x))


class MergeBlock(nn.Module):
    def __init__(self, cin, cout, factor):
        super().__init__()
        self.shortcut = Sep(cin, cout, 2, factor, False)
        self.branch1 = Sep(cin, cout, 2, factor, False)
        self.branch2 = Sep(cin, cout, 2, factor, False)
        self.act1 = nn.PReLU(cout)
        self.sep2 = Sep(cout, cout, 1, factor, False)
        self.act = nn.PReLU(cout)

    def forward(self, x):
        y = self.sep2(self.act1(self.branch1(x) + self.branch2(x)))
        return self.act(y + self.shortcut(x))


class VarGFaceNet(nn.Module):
    def __init__(self, multiplier=1.25, width=1.0, input_size=112, num_features=512, use_se=True,
                 last_channels=1024):
        super().__init__()
        ch = [scaled(int(n * multiplier), width, 8) for n in (32, 64, 128, 256)]
        last = scaled(last_channels, width, 16)
        self.head = nn.Module()
        self.head.stem = CBA(3, ch[0], 3, 1, 1)
        self.head.block = NormalBlock(ch[0], ch[0], 2, 1, use_se)
        stages = []
        for i, units in enumerate((3, 7, 4)):
            blocks = [MergeBlock(ch[i], ch[i + 1], 2)]
            blocks += [NormalBlock(ch[i + 1], ch[i + 1], 1, 2, use_se) for _ in range(units - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        h = input_size
        for _ in range(4):
            h = (h + 1) // 2
        self.embed = nn.Module()
        self.embed.convx = CBA(ch[3], last, 1, 1, 0)
        self.embed.dw = CBA(last, last, h, 1, 0, groups=last // 8, act=False)
        self.embed.pw = CBA(last, last // 2, 1, 1, 0)
        self.embed.fc = nn.Linear(last // 2, num_features)
        self.embed.bn = nn.BatchNorm1d(num_features, eps=2e-5)

    def forward(self, x):
        x = self.head.block(self.head.stem(x))
        for s in self.stages:
            x = s(x)
        e = self.embed
        x = torch.flatten(e.pw(e.dw(e.convx(x))), 1)
        return e.bn(e.fc(x))


# ------------------------------------------------------------------------------ counts
def count(model, input_size):
    macs = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            macs[0] += out.numel() // out.shape[0] * (m.in_channels // m.groups) \
                * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            macs[0] += m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in hs:
        h.remove()
    return {"parameters": sum(p.numel() for p in model.parameters()), "macs": macs[0]}


def randomise(model, seed):
    """Non-trivial BN statistics and PReLU slopes so the parity test checks them too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                if m.weight.requires_grad:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    counts = {}
    for d in (18, 34, 50, 100, 200):
        counts["iresnet%d" % d] = count(IResNet(d), 112)
    counts["mobilefacenet"] = count(MobileFaceNet(), 112)
    counts["mobilefacenet_large"] = count(MobileFaceNet(blocks=(2, 8, 12, 4), scale=4), 112)
    counts["vargfacenet"] = count(VarGFaceNet(use_se=True), 112)
    counts["vargfacenet_no_se"] = count(VarGFaceNet(use_se=False), 112)
    counts["_note"] = ("parameters: sum of numel over model.parameters(); macs: multiply-"
                       "accumulates of Conv2d and Linear for one 112x112 image")
    with open(os.path.join(OUT, "reference_counts.json"), "w") as f:
        json.dump(counts, f, indent=1, sort_keys=True)
    print(json.dumps(counts, indent=1, sort_keys=True))

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ir = IResNet(18, width=0.125, input_size=32, num_features=64)
    randomise(ir, 2)
    ir.eval()
    mbf = MobileFaceNet(width=0.125, input_size=32, num_features=64)
    randomise(mbf, 3)
    mbf.eval()
    torch.save(ir.state_dict(), os.path.join(OUT, "iresnet_tiny.pth"))
    torch.save(mbf.state_dict(), os.path.join(OUT, "mbf_tiny.pth"))
    with torch.no_grad():
        torch.save({"input": x, "iresnet_out": ir(x), "mbf_out": mbf(x)},
                   os.path.join(OUT, "parity_tiny.pth"))


if __name__ == "__main__":
    main()
