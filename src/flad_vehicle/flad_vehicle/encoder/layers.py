"""Building blocks of the vision encoder, each wrapped as a `Layer` that names what it reads and writes.

Declaring reads/writes per layer makes the encoder an explicit DAG over named tensors: the partitioner can
topologically sort it, compute the tensors live across any cut, and build stage modules without tracing
the internals of a layer (where the dynamic parts — pillar scatter, the GRU loop — live).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Layer(nn.Module):
    """One node of the layer sequence.

    `forward(*xs)` takes the tensors named in `reads` (in that order) and returns a tuple matching `writes`.
    """

    def __init__(self, reads: tuple[str, ...], writes: tuple[str, ...], kind: str, group: str) -> None:
        super().__init__()
        self.reads = tuple(reads)
        self.writes = tuple(writes)
        self.kind = kind      # what it is (conv, attention, ...), for reports
        self.group = group    # which component: rgb, lidar, encoder, decoder, head, loss, input


def norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    groups = 8 if channels % 8 == 0 else 1
    return nn.GroupNorm(groups, channels)


def conv_norm_act(cin: int, cout: int, k: int, stride: int, norm: str, act: bool = True) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), norm2d(norm, cout)]
    if act:
        mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class DownShortcut(nn.Module):
    """ResNet-D shortcut: average-pool then 1x1 conv, so no input pixel is skipped by a strided 1x1."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else None
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.norm = norm2d(norm, cout)

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = self.pool(x)
        return self.norm(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_norm_act(cin, cout, 3, stride, norm),
                                  conv_norm_act(cout, cout, 3, 1, norm, act=False))
        self.short = DownShortcut(cin, cout, stride, norm) if (stride > 1 or cin != cout) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(conv_norm_act(cin, width, 1, 1, norm), conv_norm_act(width, width, 3, stride, norm),
                                  conv_norm_act(width, cout, 1, 1, norm, act=False))
        self.short = DownShortcut(cin, cout, stride, norm) if (stride > 1 or cin != cout) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.short(x))


def sine_pos_2d(h: int, w: int, d: int, device: torch.device | None = None) -> Tensor:
    """DETR-style 2D sine positional encoding, [h*w, d] (half the channels for rows, half for columns)."""
    npf = d // 4
    dim_t = torch.arange(npf, dtype=torch.float32, device=device)
    dim_t = 10000.0 ** (dim_t / npf)
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w * 2 * math.pi
    py = ys[:, None] / dim_t
    px = xs[:, None] / dim_t
    py = torch.cat([py.sin(), py.cos()], dim=1)            # [h, 2npf]
    px = torch.cat([px.sin(), px.cos()], dim=1)            # [w, 2npf]
    pos = torch.cat([py[:, None, :].expand(h, w, -1), px[None, :, :].expand(h, w, -1)], dim=-1).reshape(h * w, -1)
    if pos.shape[1] < d:
        pos = F.pad(pos, (0, d - pos.shape[1]))
    return pos


class Attention(nn.Module):
    """Multi-head attention with explicit matmuls (so FlopCounterMode counts it on every backend)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x: Tensor, mem: Tensor) -> Tensor:
        B, Tq, D = x.shape
        Tk = mem.shape[1]
        hd = D // self.h
        q = self.q(x).view(B, Tq, self.h, hd).transpose(1, 2)
        k, v = self.kv(mem).view(B, Tk, 2, self.h, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-1, -2)) * (hd ** -0.5), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, Tq, D))


class FeedForward(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------------- layers


class MeasurementLayer(Layer):
    """Embeds speed (conditions the learned decoder queries) and the target point (GRU initial state).

    Kept in the first stage so that no raw measurement leaves the data-owning vehicle either.
    """

    def __init__(self, d: int, gru_hidden: int) -> None:
        super().__init__(("speed", "target_point"), ("meas.speed", "meas.wp_h0"), "mlp", "input")
        self.speed = nn.Sequential(nn.Linear(1, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.tp = nn.Linear(2, gru_hidden)

    def forward(self, speed: Tensor, target_point: Tensor) -> tuple[Tensor, Tensor]:
        s = self.speed(speed.float().reshape(-1, 1) / 10.0)
        h0 = torch.tanh(self.tp(target_point.float() / 20.0))
        return s, h0


class RgbStem(Layer):
    """Normalises the raw uint8 HWC camera images and applies the (deep) stem + max-pool, per camera."""

    def __init__(self, cameras: tuple[str, ...], stem: tuple[int, ...], norm: str, pool: bool = True,
                 input_norm: str = "imagenet") -> None:
        super().__init__(cameras, tuple(f"rgb.0.{c}" for c in cameras), "conv", "rgb")
        mods: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(stem):
            mods.append(conv_norm_act(cin, c, 3, 2 if i == 0 else 1, norm))
            cin = c
        if pool:
            mods.append(nn.MaxPool2d(3, 2, 1))
        self.body = nn.Sequential(*mods)
        self.input_norm = input_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, *images: Tensor) -> tuple[Tensor, ...]:
        out = []
        for img in images:
            x = img.permute(0, 3, 1, 2).float()
            if self.input_norm == "instance":
                # per image and channel: removes a town's global colour cast / brightness (weather, night)
                x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + 1.0)
            else:
                x = (x - self.mean) / self.std
            out.append(self.body(x))
        return tuple(out)


class TrafficLightFocus(Layer):
    """LMDrive-style focus view for traffic lights, taken inside the model from the front camera.

    The lamp heads that govern the ego are 1-3 px wide in the 128x128 front image, above the horizon and near
    the image centre (they hang over the ego's lane on the far side of the junction). The shared RGB stem
    reaches stride 4 after two layers and mixes them away, so this layer crops that region at full resolution,
    standardises it per image (lamps glow at full colour while towns differ in brightness/weather), runs a
    small stride-1/2 CNN and max-pools to a coarse grid (a lamp anywhere in a cell survives; the grid keeps
    *where*, which tells the ego's light from cross-traffic lights). Output: one d-token per sample.
    """

    def __init__(self, camera: str, size: tuple[int, int], box: tuple[float, ...], widths: tuple[int, ...],
                 grid: tuple[int, ...], norm: str, d: int) -> None:
        super().__init__((camera,), ("tl.focus",), "conv", "tl")
        h, w = size
        self.rows = (int(round(box[0] * h)), int(round(box[1] * h)))
        self.cols = (int(round(box[2] * w)), int(round(box[3] * w)))
        mods: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(widths):
            mods.append(conv_norm_act(cin, c, 3, 2 if i == 1 else 1, norm))
            cin = c
        self.body = nn.Sequential(*mods)
        self.pool = nn.AdaptiveMaxPool2d((int(grid[0]), int(grid[1])))
        self.proj = nn.Sequential(nn.Linear(cin * int(grid[0]) * int(grid[1]), d), nn.LayerNorm(d))

    def forward(self, img: Tensor) -> tuple[Tensor]:
        x = img[:, self.rows[0]: self.rows[1], self.cols[0]: self.cols[1]].permute(0, 3, 1, 2).float()
        x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + 1.0)
        return (self.proj(self.pool(self.body(x)).flatten(1)),)


class PerView(Layer):
    """A block shared by all cameras (weights shared, as one backbone sees every view)."""

    def __init__(self, body: nn.Module, cameras: tuple[str, ...], src: str, dst: str, kind: str, group: str) -> None:
        super().__init__(tuple(f"{src}.{c}" for c in cameras), tuple(f"{dst}.{c}" for c in cameras), kind, group)
        self.body = body

    def forward(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.body(x) for x in xs)


class RgbTokens(Layer):
    """Projects each view's map to d, adds 2D sine position + view embedding; one global token per view."""

    def __init__(self, cameras: tuple[str, ...], src: str, cin: int, d: int) -> None:
        super().__init__(tuple(f"{src}.{c}" for c in cameras), ("rgb.tokens",), "conv", "rgb")
        self.proj = nn.Conv2d(cin, d, 1)
        self.view = nn.Parameter(torch.randn(len(cameras), d) * 0.02)
        self.glob = nn.Parameter(torch.randn(1, d) * 0.02)
        self.d = d

    def forward(self, *maps: Tensor) -> tuple[Tensor]:
        toks, globs = [], []
        for i, m in enumerate(maps):
            f = self.proj(m)                                   # [B, d, h, w]
            _, d, h, w = f.shape
            t = f.flatten(2).transpose(1, 2) + sine_pos_2d(h, w, d, f.device) + self.view[i]
            toks.append(t)
            globs.append(f.mean(dim=(2, 3)) + self.view[i] + self.glob[0])
        return (torch.cat([torch.stack(globs, dim=1), *toks], dim=1),)


class PillarLayer(Layer):
    """PointPillars feature net: per-point features, a shared MLP, and max-scatter into a BEV grid.

    Pure torch: pillar means via `index_add`, the max via `scatter_reduce(amax)`, fixed shapes (rays with no
    return or outside the grid are sent to a dump cell that is dropped), so no compiled extension is needed.
    Grid rows run from far (x = 40 m) to near (x = -10 m), columns from left (y = 25 m) to right, like the
    BEV label.
    """

    def __init__(self, grid: int, channels: int, x_range: tuple[float, float], y_range: tuple[float, float],
                 max_h: float) -> None:
        super().__init__(("lidar",), ("lidar.0",), "scatter", "lidar")
        self.grid = grid
        self.x_range = x_range
        self.y_range = y_range
        self.max_h = max_h
        self.res_x = (x_range[1] - x_range[0]) / grid
        self.res_y = (y_range[1] - y_range[0]) / grid
        self.mlp = nn.Sequential(nn.Linear(9, channels), nn.LayerNorm(channels), nn.ReLU())
        self.channels = channels

    def forward(self, pts: Tensor) -> tuple[Tensor]:
        B = pts.shape[0]
        G = self.grid
        x, y, z, inten = pts.float().unbind(-1)
        row = torch.floor((self.x_range[1] - x) / self.res_x).long()
        col = torch.floor((self.y_range[1] - y) / self.res_y).long()
        valid = (inten >= 0) & (row >= 0) & (row < G) & (col >= 0) & (col < G) & (z > -2.0) & (z < self.max_h)
        cells = G * G + 1
        cell = torch.where(valid, row * G + col, torch.full_like(row, G * G))
        flat = (cell + torch.arange(B, device=pts.device).view(B, 1) * cells).reshape(-1)          # [B*N]
        xyz = torch.stack([x, y, z], dim=-1).reshape(-1, 3)
        vmask = valid.reshape(-1, 1).float()
        sums = torch.zeros(B * cells, 3, device=pts.device).index_add(0, flat, xyz * vmask)
        counts = torch.zeros(B * cells, 1, device=pts.device).index_add(0, flat, vmask)
        mean = sums / counts.clamp(min=1.0)
        cx = self.x_range[1] - (row.float() + 0.5) * self.res_x
        cy = self.y_range[1] - (col.float() + 0.5) * self.res_y
        feats = torch.cat([
            xyz / torch.tensor([20.0, 20.0, 2.0], device=pts.device), inten.reshape(-1, 1).clamp(min=0),
            xyz - mean[flat], (x - cx).reshape(-1, 1) / self.res_x, (y - cy).reshape(-1, 1) / self.res_y,
        ], dim=1) * vmask
        h = self.mlp(feats) * vmask                                                               # [B*N, C] >= 0
        C = self.channels
        bev = torch.zeros(B * cells, C, device=pts.device, dtype=h.dtype)
        bev = bev.scatter_reduce(0, flat.view(-1, 1).expand(-1, C), h, reduce="amax", include_self=True)
        bev = bev.view(B, cells, C)[:, : G * G].reshape(B, G, G, C).permute(0, 3, 1, 2).contiguous()
        return (bev,)


class Single(Layer):
    """A plain module from one named tensor to one named tensor."""

    def __init__(self, body: nn.Module, src: str, dst: str, kind: str, group: str) -> None:
        super().__init__((src,), (dst,), kind, group)
        self.body = body

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.body(x),)


class LidarTokens(Layer):
    def __init__(self, src: str, cin: int, d: int) -> None:
        super().__init__((src,), ("lidar.tokens",), "conv", "lidar")
        self.proj = nn.Conv2d(cin, d, 1)
        self.type_emb = nn.Parameter(torch.randn(1, d) * 0.02)

    def forward(self, m: Tensor) -> tuple[Tensor]:
        f = self.proj(m)
        _, d, h, w = f.shape
        return (f.flatten(2).transpose(1, 2) + sine_pos_2d(h, w, d, f.device) + self.type_emb[0],)


class Fuse(Layer):
    """Concatenates camera and LiDAR tokens into the transformer encoder's input sequence."""

    def __init__(self) -> None:
        super().__init__(("rgb.tokens", "lidar.tokens"), ("enc.0",), "concat", "encoder")

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor]:
        return (torch.cat([a, b], dim=1),)


class EncoderLayer(Layer):
    """Post-norm transformer encoder layer (as DETR/InterFuser), dropout-free so stages compose exactly."""

    def __init__(self, i: int, d: int, heads: int, ffn: int) -> None:
        super().__init__((f"enc.{i}",), (f"enc.{i + 1}",), "attention", "encoder")
        self.attn = Attention(d, heads)
        self.n1 = nn.LayerNorm(d)
        self.ff = FeedForward(d, ffn)
        self.n2 = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        x = self.n1(x + self.attn(x, x))
        return (self.n2(x + self.ff(x)),)


class QueryLayer(Layer):
    """Decoder queries: BEV-grid queries (learned + 2D position) then traffic-light and waypoint queries,
    the learned ones conditioned on speed (added speed embedding); with a focus view, its token is added to
    the traffic-light query, so the decoder's traffic-light token (an LLM feature) carries what it saw."""

    def __init__(self, d: int, bev_q: int, n_wp: int, focus: bool = False) -> None:
        super().__init__(("meas.speed", "tl.focus") if focus else ("meas.speed",), ("dec.0",), "embed", "decoder")
        self.bev = nn.Parameter(torch.randn(bev_q * bev_q, d) * 0.02)
        self.learned = nn.Parameter(torch.randn(1 + n_wp, d) * 0.02)
        self.register_buffer("pos", sine_pos_2d(bev_q, bev_q, d), persistent=False)

    def forward(self, speed_emb: Tensor, focus: Tensor | None = None) -> tuple[Tensor]:
        B = speed_emb.shape[0]
        bev = (self.bev + self.pos).unsqueeze(0).expand(B, -1, -1)
        learned = self.learned.unsqueeze(0) + speed_emb.unsqueeze(1)
        if focus is not None:
            learned = torch.cat([learned[:, :1] + focus.unsqueeze(1), learned[:, 1:]], dim=1)
        return (torch.cat([bev, learned], dim=1),)


class DecoderLayer(Layer):
    def __init__(self, i: int, d: int, heads: int, ffn: int) -> None:
        super().__init__((f"dec.{i}", "memory"), (f"dec.{i + 1}",), "attention", "decoder")
        self.self_attn = Attention(d, heads)
        self.n1 = nn.LayerNorm(d)
        self.cross = Attention(d, heads)
        self.n2 = nn.LayerNorm(d)
        self.ff = FeedForward(d, ffn)
        self.n3 = nn.LayerNorm(d)

    def forward(self, q: Tensor, mem: Tensor) -> tuple[Tensor]:
        q = self.n1(q + self.self_attn(q, q))
        q = self.n2(q + self.cross(q, mem))
        return (self.n3(q + self.ff(q)),)


class BevHead(Layer):
    """Each BEV query predicts a p x p patch of the occupancy logits (coarse grid + pixel-shuffle upsampling)."""

    def __init__(self, src: str, d: int, bev_q: int, bev_size: int) -> None:
        super().__init__((src,), ("pred.bev",), "linear", "head")
        self.q = bev_q
        self.p = bev_size // bev_q
        self.net = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, self.p * self.p))

    def forward(self, dec: Tensor) -> tuple[Tensor]:
        B = dec.shape[0]
        q, p = self.q, self.p
        x = self.net(dec[:, : q * q]).view(B, q, q, p, p).permute(0, 1, 3, 2, 4).reshape(B, q * p, q * p)
        return (x,)


class TrafficLightHead(Layer):
    """MLP on the decoder's traffic-light token; with a focus view also on the focus token directly (a short
    path for the small-lamp evidence, which the post-norm decoder layers would otherwise have to preserve)."""

    def __init__(self, src: str, d: int, bev_q: int, n_cls: int, focus: bool = False) -> None:
        super().__init__((src, "tl.focus") if focus else (src,), ("pred.tl",), "linear", "head")
        self.idx = bev_q * bev_q
        self.net = nn.Sequential(nn.Linear(2 * d if focus else d, d), nn.ReLU(inplace=True), nn.Linear(d, n_cls))

    def forward(self, dec: Tensor, focus: Tensor | None = None) -> tuple[Tensor]:
        x = dec[:, self.idx]
        if focus is not None:
            x = torch.cat([x, focus], dim=-1)
        return (self.net(x),)


class WaypointHead(Layer):
    """GRU over the waypoint queries, initial state from the target point; outputs cumulative offsets."""

    def __init__(self, src: str, d: int, bev_q: int, n_wp: int, hidden: int) -> None:
        super().__init__((src, "meas.wp_h0"), ("pred.waypoints",), "gru", "head")
        self.start = bev_q * bev_q + 1
        self.n = n_wp
        self.gru = nn.GRU(d, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 2)

    def forward(self, dec: Tensor, h0: Tensor) -> tuple[Tensor]:
        x = dec[:, self.start: self.start + self.n]
        y, _ = self.gru(x, h0.unsqueeze(0).contiguous())
        return (torch.cumsum(self.out(y), dim=1),)


class FeatureHead(Layer):
    """LLM features: BEV queries avg-pooled to k x k tokens + traffic-light token + waypoint tokens."""

    def __init__(self, src: str, bev_q: int, pool: int, n_wp: int) -> None:
        super().__init__((src,), ("features",), "pool", "head")
        self.q = bev_q
        self.pool = pool
        self.n = n_wp

    def forward(self, dec: Tensor) -> tuple[Tensor]:
        B, _, d = dec.shape
        q = self.q
        grid = dec[:, : q * q].transpose(1, 2).reshape(B, d, q, q)
        pooled = F.adaptive_avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        return (torch.cat([pooled, dec[:, q * q: q * q + 1 + self.n]], dim=1),)


class LossLayer(Layer):
    """Multi-task loss after LMDrive: w_bev * BCE(occupancy) + w_tl * CE(light) + w_wp * L1(waypoints).

    Reads the labels, so labels travel with the activations to the last stage.
    """

    def __init__(self, w_bev: float, w_tl: float, w_wp: float, pos_weight: float,
                 tl_class_weights: tuple[float, ...] = ()) -> None:
        super().__init__(("pred.bev", "pred.tl", "pred.waypoints", "bev", "tl_state", "waypoints"),
                         ("loss", "loss.bev", "loss.tl", "loss.wp"), "loss", "loss")
        self.w = (w_bev, w_tl, w_wp)
        self.register_buffer("pos_weight", torch.tensor(pos_weight), persistent=False)
        self.tl_weight: Tensor | None
        if tl_class_weights:
            self.register_buffer("tl_weight", torch.tensor(tl_class_weights, dtype=torch.float32), persistent=False)
        else:
            self.tl_weight = None

    def forward(self, pbev: Tensor, ptl: Tensor, pwp: Tensor, bev: Tensor, tl: Tensor, wp: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        l_bev = F.binary_cross_entropy_with_logits(pbev, (bev > 0).float(), pos_weight=self.pos_weight)
        y = tl.long().reshape(-1)
        if self.tl_weight is None:
            l_tl = F.cross_entropy(ptl, y)
        else:
            # per-sample weights, then a plain mean (not torch's sum-of-weights normalisation): the loss stays a
            # mean over samples, so micro-batched pipeline steps (FHDP) equal the whole-batch step exactly
            l_tl = (F.cross_entropy(ptl, y, reduction="none") * self.tl_weight[y]).mean()
        l_wp = F.l1_loss(pwp, wp.float())
        total = self.w[0] * l_bev + self.w[1] * l_tl + self.w[2] * l_wp
        return total, l_bev, l_tl, l_wp
