"""The three encoder families of HCMoCo (Sec. 3.4): HRNet for images, SemGCN for 2D keypoints, PointNet++ for
depth points. Plain PyTorch, no compiled extensions; only torch is imported, so the file can be copied alone.

    HRNet      RGB [B,3,H,W] or depth [B,1|3,H,W] -> 4 maps at 1/4, 1/8, 1/16, 1/32 with width x (1, 2, 4, 8) channels
    SemGCN     keypoints [B,16,2] (+ visibility)   -> joint features [B,16,hidden]
    PointNet2  points [B,N,3] (+ features)          -> per-point features [B,C,N]
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.01  # of the HRNet's BatchNorm running statistics, as published (official_hrnet.py)


# ----------------------------------------------------------------------------------------------------- checkpoints
class CheckpointError(ValueError):
    """A file that is not the checkpoint it was given as; the message is one line naming the file."""


def load_checkpoint(path, expected="a checkpoint", keys=(), map_location="cpu"):
    """torch.load of tensors and plain containers only (weights_only=True), so a crafted file cannot run code.
    A file that cannot be read that way, or that is not a dict holding `keys`, raises CheckpointError saying it
    is not `expected` (the project's command lines print that line and exit)."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a bad file fails in many ways: UnpicklingError, EOFError, KeyError, RuntimeError (zip)
        why = (e.strerror or str(e)) if isinstance(e, OSError) else "not a PyTorch file of tensors and plain containers"
        raise CheckpointError(f"{path}: not {expected} ({why})") from e
    missing = [k for k in keys if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise CheckpointError(f"{path}: not {expected} (no {', '.join(map(repr, missing))})")
    return ckpt


# ----------------------------------------------------------------------------------------------------------- HRNet
def conv_bn(cin, cout, kernel, stride=1, relu=True):
    """Conv (no bias) + BN (+ ReLU) as an nn.Sequential, so state_dict keys read `.0.weight`, `.1.weight`."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def make_blocks(block, cin, planes, n):
    """n blocks; the first one projects cin -> planes * expansion with a 1x1 conv-BN `downsample` when needed."""
    cout = planes * block.expansion
    down = None if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential(block(cin, planes, downsample=down), *[block(cout, planes) for _ in range(n - 1)])


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every branch i receives the sum of all branches j resampled to it:
    j > i: 1x1 conv-BN then bilinear upsampling (align_corners=False, as published); j < i: (i - j) stride-2 3x3 convs; j == i: identity."""

    def __init__(self, channels, blocks):
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(make_blocks(BasicBlock, c, c, blocks) for c in channels)
        self.fuse_layers = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(conv_bn(channels[j], channels[i], 1, relu=False))
                elif j == i:
                    row.append(None)
                else:  # i - j stride-2 convs; only the last one changes the width and has no ReLU
                    row.append(nn.Sequential(*[conv_bn(channels[j], channels[j], 3, 2) for _ in range(i - j - 1)],
                                             conv_bn(channels[j], channels[i], 3, 2, relu=False)))
            self.fuse_layers.append(row)

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i]
            for j, fuse in enumerate(row):
                if j > i:
                    y = y + F.interpolate(fuse(xs[j]), size=xs[i].shape[-2:], mode="bilinear", align_corners=False)
                elif j < i:
                    y = y + fuse(xs[j])
            out.append(F.relu(y))
        return out


class HRNet(nn.Module):
    """HRNetV2 backbone (Sun et al., 2019) with the official state_dict names, so ImageNet checkpoints load.

    stem: two stride-2 3x3 conv-BN-ReLU (conv1/bn1, conv2/bn2) -> layer1: `stem_blocks` Bottlenecks ->
    transition1, stage2 (2 branches), transition2, stage3 (3 branches), transition3, stage4 (4 branches), stage k
    made of `modules[k-2]` HighResolutionModules of `blocks` BasicBlocks per branch.
    Output: 4 maps at 1/4, 1/8, 1/16, 1/32 of the input with `out_channels` = width x (1, 2, 4, 8) channels.
    `bn_momentum`: of every BatchNorm's running statistics (the published 0.01 by default).

    The published HRNet-W18 is the default (9,562,260 parameters); `HRNet.small()` is the same family made
    narrow and shallow for CPU training.
    """

    def __init__(self, width=18, in_channels=3, stem_channels=64, stem_blocks=4, blocks=4, modules=(1, 4, 3),
                 init="official", bn_momentum=BN_MOMENTUM):
        super().__init__()
        self.out_channels = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.conv2 = nn.Conv2d(stem_channels, stem_channels, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_channels)
        self.layer1 = make_blocks(Bottleneck, stem_channels, stem_channels, stem_blocks)
        pre = [stem_channels * Bottleneck.expansion]
        for k, n_modules in zip((2, 3, 4), modules):
            cur = self.out_channels[:k]
            setattr(self, f"transition{k - 1}", self._transition(pre, cur))
            setattr(self, f"stage{k}", nn.Sequential(*[HighResolutionModule(cur, blocks) for _ in range(n_modules)]))
            pre = cur
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        self._init_weights(init)

    @staticmethod
    def _transition(pre, cur):
        """Existing branches change width with a 3x3 conv-BN-ReLU (None when equal); a new branch comes from the
        lowest-resolution existing one through a stride-2 3x3 conv-BN-ReLU."""
        layers = nn.ModuleList()
        for i, c in enumerate(cur):
            if i < len(pre):
                layers.append(None if pre[i] == c else conv_bn(pre[i], c, 3))
            else:
                layers.append(nn.Sequential(conv_bn(pre[-1], c, 3, 2)))
        return layers

    def _init_weights(self, init):
        """'official': normal with std 0.001, as the official code, which then loads ImageNet weights over it;
        'he': He et al. (2015) normal with fan-out, for training from scratch."""
        if init not in ("official", "he"):
            raise ValueError(f"init must be 'official' or 'he', got {init!r}")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "he":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def small(cls, in_channels=3, width=16, init="official", bn_momentum=BN_MOMENTUM):
        """The CPU configuration: same architecture family, 1 BasicBlock per branch, 1 module per stage."""
        return cls(width=width, in_channels=in_channels, stem_channels=32, stem_blocks=1, blocks=1, modules=(1, 1, 1),
                   init=init, bn_momentum=bn_momentum)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for k in (2, 3, 4):
            transition = getattr(self, f"transition{k - 1}")
            # a new branch grows from the lowest-resolution map so far
            xs = [xs[min(i, len(xs) - 1)] if t is None else t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(transition)]
            xs = getattr(self, f"stage{k}")(xs)
        return xs  # [B, w, H/4, W/4], [B, 2w, H/8, W/8], [B, 4w, H/16, W/16], [B, 8w, H/32, W/32]

    # the configurations HRNet.describe names, in the constructor's arguments (width and in_channels aside)
    PUBLISHED = dict(stem_channels=64, stem_blocks=4, blocks=4, modules=(1, 4, 3))  # HRNetV2-W18 / W32 / W48
    SMALL = dict(stem_channels=32, stem_blocks=1, blocks=1, modules=(1, 1, 1))  # HRNet.small

    @staticmethod
    def architecture(state):
        """The constructor arguments of the HRNet that a state_dict with the official names belongs to, read from
        its tensors: in_channels and stem_channels from the stem convolutions, the width from stage 2's first
        branch, and the numbers of stem Bottlenecks, blocks per branch and modules per stage from the indices in
        the names. ValueError naming the first tensor it needs and lacks."""
        def count(prefix, suffix):  # distinct integers i in the names prefix{i}suffix
            return len({k[len(prefix):-len(suffix)] for k in state if k.startswith(prefix) and k.endswith(suffix)
                        and k[len(prefix):-len(suffix)].isdigit()})

        for key in ("conv2.weight", "stage2.0.branches.0.0.conv1.weight"):
            if key not in state:
                raise ValueError(f"no {key}")
        return dict(width=state["stage2.0.branches.0.0.conv1.weight"].shape[0],
                    in_channels=state["conv1.weight"].shape[1] if "conv1.weight" in state else 3,
                    stem_channels=state["conv2.weight"].shape[0], stem_blocks=count("layer1.", ".conv1.weight"),
                    blocks=count("stage2.0.branches.0.", ".conv1.weight"),
                    modules=tuple(count(f"stage{k}.", ".branches.0.0.conv1.weight") for k in (2, 3, 4)))

    @classmethod
    def describe(cls, arch):
        """A line naming the configuration of HRNet.architecture's `arch`: HRNetV2-W<width> for the published
        ones, HRNet.small(width=...) for the CPU one (which is not W18), the arguments otherwise."""
        rest = {k: v for k, v in arch.items() if k not in ("width", "in_channels")}
        w = arch["width"]
        shape = (f"widths {w}-{2 * w}-{4 * w}-{8 * w}, stem {rest['stem_channels']} channels with "
                 f"{rest['stem_blocks']} Bottleneck(s), {rest['blocks']} BasicBlock(s) per branch, modules "
                 + "-".join(map(str, rest["modules"])) + f" in stages 2-3-4, {arch['in_channels']} input channels")
        if rest == cls.PUBLISHED:
            return f"HRNetV2-W{w}, the published configuration ({shape})"
        name = f"HRNet.small(width={w}), not HRNet-W18" if rest == cls.SMALL else "HRNet(" + ", ".join(
            f"{k}={v}" for k, v in arch.items()) + ")"
        return f"{name} ({shape})"

    @classmethod
    def from_pretrained(cls, path, init="official", prefixes=("backbone.",), ckpt=None, fallback=None,
                        bn_momentum=BN_MOMENTUM):
        """(net, report): an HRNet of the configuration of the file at `path` (HRNet.architecture of the tensors
        hrnet_state finds; `ckpt`: the file already loaded), with the file's weights (load_state); `init` for what
        the file lacks, `bn_momentum` for its BatchNorms. A file whose configuration cannot be read raises
        CheckpointError, or, with a `fallback` HRNet, is loaded into it (load_state then names what does not
        match)."""
        ckpt = load_checkpoint(path, "an HRNet state_dict") if ckpt is None else ckpt
        state, _ = hrnet_state(ckpt, path, prefixes)
        try:
            net = cls(**cls.architecture(state), init=init, bn_momentum=bn_momentum)
        except ValueError as e:
            if fallback is None:
                raise CheckpointError(f"{path}: not an HRNet state_dict ({e})") from e
            net = fallback
        return net, net.load_state(ckpt, path, prefixes)

    def load_pretrained(self, path, prefixes=("backbone.",)):
        """Load an HRNet checkpoint (e.g. the official hrnetv2_w18_imagenet_pretrained.pth): load_state of the file."""
        return self.load_state(load_checkpoint(path, "an HRNet state_dict"), path, prefixes)

    def load_state(self, ckpt, source, prefixes=("backbone.",), min_share=0.9):
        """Copy the tensors of a checkpoint that match this HRNet's by name and shape; `source` names it in messages.

        The HRNet's tensors are those hrnet_state finds. Entries whose shape differs (e.g. conv1 for in_channels=1)
        are skipped. A file that fills fewer than `min_share` of this HRNet's weight tensors (num_batches_tracked
        aside) raises CheckpointError: naming both configurations when its tensors of other shapes are those of
        another HRNet configuration (HRNet.architecture, the input channels aside), else an unmatched key of the
        file and an expected one.
        Returns and prints the report {'missing': [...], 'unexpected': [...], 'mismatched': [...]}: this HRNet's
        tensors left as they were, the file's tensors that are not this HRNet's, and those of another shape."""
        state, prefix = hrnet_state(ckpt, source, prefixes)
        own = self.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        copied = [k for k in state if k in own and k not in mismatched]
        weights = [k for k in own if not k.endswith("num_batches_tracked")]  # a step count, not a weight
        missing = [k for k in weights if k not in copied]
        report = {"missing": missing, "unexpected": [k for k in state if k not in own], "mismatched": mismatched}
        if len(weights) - len(missing) < min_share * len(weights):
            try:  # tensors of other shapes: perhaps a whole HRNet of another configuration
                theirs, mine = (self.architecture(state), self.architecture(own)) if mismatched else (None, None)
            except ValueError:  # not enough of an HRNet to tell its configuration: the keys say what is wrong
                theirs = mine = None
            if theirs is not None and dict(theirs, in_channels=0) != dict(mine, in_channels=0):
                raise CheckpointError(f"{source}: holds an {self.describe(theirs)}; this network is an "
                                      f"{self.describe(mine)}")
            if mismatched:
                k = mismatched[0]
                example = f"the file's {k!r} is {list(state[k].shape)}, the HRNet's {list(own[k].shape)}"
            else:
                other = next((k for k in state if k not in own), None)
                example = (f"the file has {prefix + other!r}, " if other else "") + f"the HRNet expects {missing[0]!r}"
            raise CheckpointError(
                f"{source}: {len(weights) - len(missing)} of the HRNet's {len(weights)} weight tensors match by name "
                f"and shape ({example}): another architecture, or keys under a prefix other than "
                f"{', '.join(map(repr, ('module.', *prefixes)))}?")
        self.load_state_dict({k: state[k] for k in copied}, strict=False)
        print(f"HRNet.load_pretrained({source}{f', under {prefix!r}' if prefix else ''}): "
              f"{len(weights) - len(missing)}/{len(weights)} weight tensors loaded, "
              + ", ".join(f"{len(v)} {k}" for k, v in report.items()))
        return report


def hrnet_state(ckpt, source, prefixes=("backbone.",)):
    """(state, prefix): the HRNet tensors of a loaded checkpoint. Accepts a bare state_dict or one under
    'state_dict' / 'model', with 'module.' prefixes; when keys start with one of `prefixes` (the first found), the
    HRNet is the keys under it (prefix removed), the rest of a larger model left aside. Anything else raises
    CheckpointError naming `source`."""
    state = ckpt
    for key in ("state_dict", "model"):
        state = state.get(key, state) if isinstance(state, dict) else state
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
        raise CheckpointError(
            f"{source}: not an HRNet state_dict (no dict of tensors, bare or under 'state_dict' / 'model')")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in state)), "")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix


def merge_maps(maps):
    """HRNetV2 representation: upsample the 4 maps to the 1/4 map's size (bilinear, align_corners=False as the
    published merge and fuse layers) and concatenate.
    [B,w,h,w'], [B,2w,..], [B,4w,..], [B,8w,..] -> [B, 15w, h, w']"""
    size = maps[0].shape[-2:]
    return torch.cat([maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]], 1)


# ---------------------------------------------------------------------------------------------------------- SemGCN
def skeleton_adjacency(parents):
    """[J, J] bool adjacency with self loops from a parent list."""
    J = len(parents)
    adj = torch.eye(J, dtype=torch.bool)
    for j, p in enumerate(parents):
        if p >= 0:
            adj[j, p] = adj[p, j] = True
    return adj


class SemGraphConv(nn.Module):
    """Semantic graph convolution (Zhao et al., CVPR 2019):

        h'_i = W_0 h_i * a_ii + sum_{j in N(i), j != i} a_ij W_1 h_j,   a_i = softmax_j over N(i) ∪ {i} of M_ij

    with a learnable score M_ij per edge of the skeleton. Joints marked invisible send no messages: their scores
    are masked out of their neighbours' softmax (a joint always keeps its self loop)."""

    def __init__(self, cin, cout, adjacency):
        super().__init__()
        self.register_buffer("adjacency", adjacency)
        self.W = nn.Parameter(torch.empty(2, cin, cout))
        nn.init.xavier_uniform_(self.W, gain=1.414)
        self.M = nn.Parameter(torch.ones(int(adjacency.sum())))  # one score per edge, as in the paper
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, h, visible=None):
        # h: [B, J, cin], visible: [B, J] bool or None
        J = h.shape[1]
        eye = torch.eye(J, dtype=torch.bool, device=h.device)
        scores = torch.full((J, J), float("-inf"), device=h.device, dtype=h.dtype)
        scores = scores.masked_scatter(self.adjacency, self.M.to(h.dtype))  # [J, J]
        if visible is not None:
            scores = scores.masked_fill(~visible[:, None, :] & ~eye, float("-inf"))  # [B, J, J]
        a = scores.softmax(dim=-1)
        h0, h1 = h @ self.W[0], h @ self.W[1]  # [B, J, cout]
        return (a * eye) @ h0 + (a * ~eye) @ h1 + self.bias


class GraphConvBlock(nn.Module):
    """SemGraphConv -> BN over channels -> ReLU."""

    def __init__(self, cin, cout, adjacency):
        super().__init__()
        self.gconv = SemGraphConv(cin, cout, adjacency)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, h, visible=None):
        return F.relu(self.bn(self.gconv(h, visible).transpose(1, 2)).transpose(1, 2))


class ResGraphBlock(nn.Module):
    def __init__(self, hidden, adjacency):
        super().__init__()
        self.a = GraphConvBlock(hidden, hidden, adjacency)
        self.b = GraphConvBlock(hidden, hidden, adjacency)

    def forward(self, h, visible=None):
        return h + self.b(self.a(h, visible), visible)


class SemGCN(nn.Module):
    """Keypoint encoder: SemGraphConv input layer, `layers` residual blocks of two SemGraphConvs, output layer.

    parents: the skeleton's parent list, parents[j] the joint that j hangs from (-1 for the root); its bones and
    the self loops are the graph. keypoints [B, J, in_dim] (normalised coordinates), visible [B, J] bool or None
    -> [B, J, hidden]. Invisible joints' inputs are zeroed and they feed no neighbour at any layer."""

    def __init__(self, hidden=128, layers=4, in_dim=2, *, parents):
        super().__init__()
        adjacency = skeleton_adjacency(parents)
        self.input = GraphConvBlock(in_dim, hidden, adjacency)
        self.blocks = nn.ModuleList(ResGraphBlock(hidden, adjacency) for _ in range(layers))
        self.output = SemGraphConv(hidden, hidden, adjacency)

    def forward(self, keypoints, visible=None):
        if visible is not None:
            keypoints = keypoints * visible[..., None]
        h = self.input(keypoints, visible)
        for block in self.blocks:
            h = block(h, visible)
        return self.output(h, visible)


# ------------------------------------------------------------------------------------------------------- PointNet++
def farthest_point_sample(xyz, npoint, valid=None):
    """Iterative farthest point sampling: pick 0 is the first valid point, pick k the point farthest from picks
    0..k-1. The loop runs over the npoint picks (inherently sequential); each pick is vectorised over B and N.
    xyz [B, N, 3], valid [B, N] bool or None -> idx [B, npoint] long. Invalid points are never picked while a
    valid one remains."""
    B, N, _ = xyz.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=xyz.device) if valid is None else valid
    dist = torch.full((B, N), float("inf"), device=xyz.device).masked_fill(~valid, -1.0)  # [B, N]
    idx = torch.empty(B, npoint, dtype=torch.long, device=xyz.device)
    current = valid.float().argmax(dim=1)  # [B]
    batch = torch.arange(B, device=xyz.device)
    for k in range(npoint):
        idx[:, k] = current
        d = ((xyz - xyz[batch, current][:, None]) ** 2).sum(-1)  # [B, N]
        dist = torch.where(valid, torch.minimum(dist, d), dist)
        current = dist.argmax(dim=1)
    return idx


def ball_query(radius, nsample, xyz, centers, valid=None):
    """The first `nsample` points (in index order) within `radius` of each centre; slots left over repeat the first
    one found, as in PointNet++. xyz [B, N, 3], centers [B, S, 3] -> idx [B, S, nsample] long."""
    B, N, _ = xyz.shape
    inside = torch.cdist(centers, xyz) <= radius  # [B, S, N]
    if valid is not None:
        inside &= valid[:, None, :]
    order = torch.arange(N, device=xyz.device).expand_as(inside)
    idx = torch.where(inside, order, N).sort(dim=-1).values[..., :nsample]  # [B, S, nsample], N = empty slot
    first = idx[..., :1]
    return torch.where(idx == N, first, idx).clamp(max=N - 1)


def gather(x, idx):
    """x [B, N, C], idx [B, ...] -> [B, ..., C]."""
    B = x.shape[0]
    return x[torch.arange(B, device=x.device).view(B, *[1] * (idx.dim() - 1)), idx]


class SetAbstraction(nn.Module):
    """Sample `npoint` centres (FPS), group neighbours per radius (ball query), shared MLP on [xyz - centre, feats],
    max-pool over each group; multi-scale grouping concatenates the scales."""

    def __init__(self, npoint, radii, nsamples, cin, mlps):
        super().__init__()
        self.npoint, self.radii, self.nsamples = npoint, radii, nsamples
        self.mlps = nn.ModuleList()
        for mlp in mlps:
            layers, c = [], cin + 3
            for cout in mlp:
                layers += [nn.Conv2d(c, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                c = cout
            self.mlps.append(nn.Sequential(*layers))
        self.out_channels = sum(mlp[-1] for mlp in mlps)

    def forward(self, xyz, feats, valid=None):
        # xyz [B, N, 3], feats [B, N, C] or None -> centres [B, S, 3], features [B, S, C']
        centers = gather(xyz, farthest_point_sample(xyz, self.npoint, valid))  # [B, S, 3]
        outs = []
        for radius, k, mlp in zip(self.radii, self.nsamples, self.mlps):
            idx = ball_query(radius, k, xyz, centers, valid)  # [B, S, K]
            grouped = gather(xyz, idx) - centers[:, :, None]  # [B, S, K, 3]
            if feats is not None:
                grouped = torch.cat([grouped, gather(feats, idx)], dim=-1)  # [B, S, K, 3 + C]
            outs.append(mlp(grouped.permute(0, 3, 1, 2)).amax(dim=-1))  # [B, C', S]
        return centers, torch.cat(outs, dim=1).transpose(1, 2)


class FeaturePropagation(nn.Module):
    """Interpolate coarse features onto dense points by inverse distance over the 3 nearest coarse points,
    concatenate the dense points' own features, shared MLP."""

    def __init__(self, cin, mlp):
        super().__init__()
        layers, c = [], cin
        for cout in mlp:
            layers += [nn.Conv1d(c, cout, 1, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]
            c = cout
        self.mlp = nn.Sequential(*layers)

    def forward(self, xyz, coarse_xyz, feats, coarse_feats):
        # xyz [B, N, 3], coarse_xyz [B, S, 3], feats [B, N, C] or None, coarse_feats [B, S, C'] -> [B, N, mlp[-1]]
        interp = three_nn_interpolate(xyz, coarse_xyz, coarse_feats)  # [B, N, C']
        x = interp if feats is None else torch.cat([interp, feats], dim=-1)
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)


def three_nn_interpolate(xyz, src_xyz, src_feats, eps=1e-8):
    """f(x) = sum_{k in 3-NN(x)} w_k f_k / sum_k w_k, w_k = 1 / (||x - x_k|| + eps).
    xyz [B, N, 3], src_xyz [B, S, 3], src_feats [B, S, C] -> [B, N, C]."""
    d, idx = torch.cdist(xyz, src_xyz).topk(min(3, src_xyz.shape[1]), dim=-1, largest=False)  # [B, N, 3]
    w = 1.0 / (d + eps)
    w = w / w.sum(-1, keepdim=True)
    return (gather(src_feats, idx) * w[..., None]).sum(dim=2)


class PointNet2(nn.Module):
    """PointNet++ (Qi et al., 2017) in its segmentation form: set abstractions with multi-scale grouping (level k:
    npoints[k] centres, one ball query and shared MLP per radius of radii[k], the scales concatenated), then feature
    propagations back to every input point (fp_mlps[k]: the MLP that lands on level k, 0 = the input points).
    Radii are in the units of the points (metres for depth clouds).

    The default is the published configuration (networks/pointnet2_msg.py): 4 levels of 4,096 -> 1,024 -> 256 -> 64
    centres with radii 0.025-1.0 m, 16 and 32 neighbours, 96 -> 256 -> 512 -> 1,024 channels, propagated back to
    128 channels per point; `PointNet2.small()` is the CPU configuration.

    points [B, N, 3], feats [B, N, in_features] or None, valid [B, N] bool or None -> [B, out_channels, N]."""

    def __init__(self, in_features=0, npoints=(4096, 1024, 256, 64),
                 radii=((0.025, 0.125), (0.125, 0.25), (0.25, 0.5), (0.5, 1.0)), nsamples=(16, 32),
                 sa_mlps=(((16, 32), (32, 64)), ((64, 128), (64, 128)), ((128, 256), (128, 256)),
                          ((256, 512), (256, 512))),
                 fp_mlps=((128, 128), (256, 256), (512, 512), (512, 512))):
        super().__init__()
        self.sa = nn.ModuleList()
        skips = [in_features]  # channels of the points at each level
        for npoint, r, mlps in zip(npoints, radii, sa_mlps):
            self.sa.append(SetAbstraction(npoint, r, nsamples, skips[-1], mlps))
            skips.append(self.sa[-1].out_channels)
        fp, below = [], skips[-1]
        for k in reversed(range(len(npoints))):  # from level k + 1 onto level k
            fp.insert(0, FeaturePropagation(below + skips[k], fp_mlps[k]))
            below = fp_mlps[k][-1]
        self.fp = nn.ModuleList(fp)
        self.out_channels = fp_mlps[0][-1]

    @classmethod
    def small(cls, in_features=0, width=32, out_channels=128, npoints=(512, 128, 32)):
        """The CPU configuration: 3 levels, radii 0.05-0.4 m, widths from `width`."""
        w = width
        return cls(in_features, npoints, radii=((0.05, 0.1), (0.1, 0.2), (0.2, 0.4)), nsamples=(16, 32),
                   sa_mlps=([[w, w, 2 * w]] * 2, [[2 * w, 4 * w]] * 2, [[4 * w, 8 * w]] * 2),
                   fp_mlps=([4 * w, out_channels], [8 * w, 4 * w], [8 * w, 8 * w]))

    def forward(self, points, feats=None, valid=None):
        xyz, f = [points], [feats]
        for k, sa in enumerate(self.sa):
            x, g = sa(xyz[-1], f[-1], valid if k == 0 else None)  # later levels' centres are valid points
            xyz.append(x)
            f.append(g)
        g = f[-1]
        for k in reversed(range(len(self.fp))):
            g = self.fp[k](xyz[k], xyz[k + 1], f[k], g)
        return g.transpose(1, 2)  # [B, C, N]


def back_project(u, v, z, intrinsics):
    """Pixels (u, v) at depth z to the camera frame: X = (u - cx) z / fx, Y = (v - cy) z / fy, Z = z (metres).
    u, v, z [B, N] (u, v may broadcast), intrinsics [B, 3, 3] -> [B, N, 3]."""
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None]
    return torch.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], dim=-1)


def apply_affine(M, points):
    """Pixel coordinates through affine maps: points [B, N, 2] (x, y), M [B, 3, 3] -> M (x, y, 1), [B, N, 2]."""
    return points @ M[:, :2, :2].transpose(1, 2) + M[:, None, :2, 2]


def depth_to_points(depth, intrinsics):
    """Back-project every pixel of a depth map (back_project).
    depth [B, 1, H, W] (0 = no return), intrinsics [B, 3, 3] -> points [B, H*W, 3], valid [B, H*W] bool."""
    B, _, H, W = depth.shape
    v, u = torch.meshgrid(torch.arange(H, device=depth.device, dtype=depth.dtype),
                          torch.arange(W, device=depth.device, dtype=depth.dtype), indexing="ij")
    z = depth.reshape(B, H * W)
    return back_project(u.reshape(1, -1), v.reshape(1, -1), z, intrinsics), z > 0
