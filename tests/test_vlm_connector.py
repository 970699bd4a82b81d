"""MSC connectors against plain re-implementations of the official block, in float64."""
import pytest
import torch
import torch.nn.functional as F

from mlmamba.connector import build_connector, connector_to_official_keys, \
    official_to_connector_keys
from mlmamba_kernels.reference import ssd_scan_naive

D_MODEL, VIS, D_STATE, HEADDIM, D_CONV = 24, 20, 6, 8, 4
D_INNER = 2 * D_MODEL
NHEADS = D_INNER // HEADDIM
CONV_DIM = D_INNER + 2 * D_STATE


def rand(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale)


def official_dicts(gen, n_layers=2, swiglu=True, vis=VIS, d=D_MODEL):
    """Random mlp / bidirectional_mamba / projector dicts with the official names and shapes."""
    mlp = {"0.weight": rand(gen, d, vis, scale=vis ** -0.5), "0.bias": rand(gen, d, scale=0.1)}
    bim = {}
    for i in range(n_layers):
        m = f"layers.{i}.mixer."
        for sfx in ("", "_b"):
            bim[m + "dt_bias" + sfx] = rand(gen, NHEADS, scale=0.5) - 1.0
            bim[m + "A_log" + sfx] = rand(gen, NHEADS, scale=0.5)
            bim[m + "D" + sfx] = rand(gen, NHEADS)
            bim[m + f"conv1d{sfx}.weight"] = rand(gen, CONV_DIM, 1, D_CONV, scale=0.5)
            bim[m + f"conv1d{sfx}.bias"] = rand(gen, CONV_DIM, scale=0.1)
        bim[m + "in_proj.weight"] = rand(gen, 2 * D_INNER + 2 * D_STATE + NHEADS, d, scale=d ** -0.5)
        bim[m + "norm.weight"] = 1 + rand(gen, D_INNER, scale=0.1)
        bim[m + "out_proj.weight"] = rand(gen, d, D_INNER, scale=D_INNER ** -0.5)
        if swiglu:
            bim[f"layers.{i}.norm.weight"] = 1 + rand(gen, d, scale=0.1)
            bim[f"layers.{i}.norm.bias"] = rand(gen, d, scale=0.1)
            for w in ("w1", "w2", "w3"):
                bim[f"layers.{i}.mlp.{w}.weight"] = rand(gen, d, d, scale=d ** -0.5)
                bim[f"layers.{i}.mlp.{w}.bias"] = rand(gen, d, scale=0.1)
    bim["norm_f.weight"] = 1 + rand(gen, d, scale=0.1)
    bim["norm_f.bias"] = rand(gen, d, scale=0.1)
    proj = {"0.weight": rand(gen, 4 * d, d, scale=d ** -0.5), "0.bias": rand(gen, 4 * d, scale=0.1),
            "2.weight": rand(gen, d, 4 * d, scale=(4 * d) ** -0.5), "2.bias": rand(gen, d, scale=0.1),
            "4.weight": rand(gen, d, d, scale=d ** -0.5), "4.bias": rand(gen, d, scale=0.1)}
    return mlp, bim, proj


# -- a plain re-implementation, written from formats.md §1.4 --------------------------------
def gated_rms(y, z, w, eps=1e-5):
    h = y * F.silu(z)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w


def one_direction(zxbcdt, P, sfx):
    """One causal scan over the sequence as given: conv1d (padding w-1, trimmed) + silu, SSD."""
    b, L, _ = zxbcdt.shape
    z, xBC, dt = zxbcdt.split([D_INNER, CONV_DIM, NHEADS], -1)
    w, bias = P[f"conv1d{sfx}.weight"], P[f"conv1d{sfx}.bias"]
    xBC = F.conv1d(xBC.transpose(1, 2), w, bias, padding=D_CONV - 1, groups=CONV_DIM)[..., :L]
    xBC = F.silu(xBC).transpose(1, 2)
    x, B, C = xBC.split([D_INNER, D_STATE, D_STATE], -1)
    y = ssd_scan_naive(x.reshape(b, L, NHEADS, HEADDIM), dt, -torch.exp(P["A_log" + sfx]),
                       B.reshape(b, L, 1, D_STATE), C.reshape(b, L, 1, D_STATE),
                       D=P["D" + sfx], dt_bias=P["dt_bias" + sfx], dt_softplus=True)
    return gated_rms(y.reshape(b, L, D_INNER), z, P["norm.weight"])


def official_mixer(u, P):
    zxbcdt = u @ P["in_proj.weight"].T
    yf = one_direction(zxbcdt, P, "")
    yb = one_direction(zxbcdt.flip(1), P, "_b").flip(1)
    return ((yf + yb) / 2) @ P["out_proj.weight"].T


def official_connector(feats, mlp, bim, proj, n_layers, swiglu):
    h = F.gelu(feats @ mlp["0.weight"].T + mlp["0.bias"])
    for i in range(n_layers):
        P = {k.split(".mixer.")[1]: v for k, v in bim.items() if k.startswith(f"layers.{i}.mixer.")}
        h = h + official_mixer(h, P)
        if swiglu:
            p = f"layers.{i}."
            n = F.layer_norm(h, (h.shape[-1],), bim[p + "norm.weight"], bim[p + "norm.bias"], 1e-5)
            a = F.silu(n @ bim[p + "mlp.w1.weight"].T + bim[p + "mlp.w1.bias"])
            g = n @ bim[p + "mlp.w2.weight"].T + bim[p + "mlp.w2.bias"]
            h = h + (a * g) @ bim[p + "mlp.w3.weight"].T + bim[p + "mlp.w3.bias"]
    h = F.layer_norm(h, (h.shape[-1],), bim["norm_f.weight"], bim["norm_f.bias"], 1e-5)
    h = F.gelu(h @ proj["0.weight"].T + proj["0.bias"])
    h = F.gelu(h @ proj["2.weight"].T + proj["2.bias"])
    return h @ proj["4.weight"].T + proj["4.bias"]


def make_connector(kind, grid, swiglu=True, n_layers=2, scan_orders=None):
    kw = dict(d_state=D_STATE, d_conv=D_CONV, expand=2, headdim=HEADDIM, ngroups=1)
    return build_connector(kind, VIS, D_MODEL, grid, scan_orders, n_layers, swiglu, kw,
                           dtype=torch.float64)


def noncontig_feats(gen, b, L):
    """(b, L, VIS) float64 features as a strided slice of a bigger tensor."""
    return rand(gen, b, L, 2 * VIS + 3)[:, :, 1:2 * VIS + 1:2]


@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize("grid", [(5, 7), (1, 3)])
def test_msc_bsm_equals_official_block(rng, swiglu, grid):
    mlp, bim, proj = official_dicts(rng, swiglu=swiglu)
    conn = make_connector("msc-bsm", grid, swiglu)
    conn.load_state_dict(official_to_connector_keys(mlp, bim, proj), strict=True)
    feats = noncontig_feats(rng, 3, grid[0] * grid[1])
    assert not feats.is_contiguous()
    want = official_connector(feats, mlp, bim, proj, 2, swiglu)
    got = conn(feats)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # the conversion back gives the official dicts exactly
    m2, b2, p2 = connector_to_official_keys(conn.state_dict())
    for a, b in ((m2, mlp), (b2, bim), (p2, proj)):
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def scan_scatter(xBC, dt, z, P, i, order):
    """Scan i of a multi-order mixer along `order` on a gathered copy, output back at raster
    positions, gated-normed: written with the plain conv and the sequential SSD oracle."""
    b, L, _ = xBC.shape
    zx = torch.cat([z, xBC, dt], -1)[:, order]
    Pi = {"in_proj.weight": None, "norm.weight": P["norm.weight"],
          "conv1d.weight": P["conv_weight"][i].unsqueeze(1), "conv1d.bias": P["conv_bias"][i],
          "A_log": P["A_log"][i], "D": P["D"][i], "dt_bias": P["dt_bias"][i]}
    y = one_direction(zx, Pi, "")
    out = torch.empty_like(y)
    out[:, order] = y
    return out


def test_msc_csm_equals_separate_scans(rng):
    H, W = 4, 5
    conn = make_connector("msc-csm", (H, W))
    with torch.no_grad():  # make every order's parameters distinct
        for p in conn.parameters():
            p.add_(rand(rng, *p.shape, scale=0.05))
    raster = torch.arange(H * W)
    col = raster.view(H, W).t().reshape(-1)
    expect = torch.stack([raster, col, raster.flip(0), col.flip(0)])
    assert torch.equal(conn.orders, expect)
    mixer = conn.layers[0].mixer
    P = {k: v.detach() for k, v in mixer.state_dict().items()}
    u = rand(rng, 2, H * W, D_MODEL)
    zxbcdt = u @ P["in_proj.weight"].T
    z, xBC, dt = zxbcdt.split([D_INNER, CONV_DIM, NHEADS], -1)
    ys = [scan_scatter(xBC, dt, z, P, i, expect[i]) for i in range(4)]
    want = torch.stack(ys).mean(0) @ P["out_proj.weight"].T
    torch.testing.assert_close(mixer(u, conn.orders), want, rtol=1e-10, atol=1e-10)


def test_custom_scan_orders(rng):
    H, W = 3, 4
    perm = torch.randperm(H * W, generator=rng)
    conn = make_connector("msc-csm", (H, W), scan_orders=["col_rev", perm.tolist()], n_layers=1)
    assert conn.orders.shape == (2, H * W)
    assert torch.equal(conn.orders[1], perm)
    mixer = conn.layers[0].mixer
    P = {k: v.detach() for k, v in mixer.state_dict().items()}
    u = rand(rng, 1, H * W, D_MODEL)
    z, xBC, dt = (u @ P["in_proj.weight"].T).split([D_INNER, CONV_DIM, NHEADS], -1)
    want = torch.stack([scan_scatter(xBC, dt, z, P, i, conn.orders[i]) for i in range(2)]).mean(0)
    torch.testing.assert_close(mixer(u, conn.orders), want @ P["out_proj.weight"].T,
                               rtol=1e-10, atol=1e-10)


def test_connector_errors(rng):
    with pytest.raises(ValueError, match="connector 'nope'"):
        make_connector("nope", (2, 2))
    with pytest.raises(ValueError, match="not a permutation"):
        make_connector("msc-csm", (2, 2), scan_orders=[[0, 1, 1, 2]])
    conn = make_connector("msc-bsm", (3, 3))
    with pytest.raises(ValueError, match="got 8 visual tokens, expected 9"):
        conn(rand(rng, 1, 8, VIS))
    mlp, bim, proj = official_dicts(rng, n_layers=1)
    del bim["layers.0.mixer.A_log_b"]
    with pytest.raises(KeyError, match="layers.0.mixer.A_log has no matching backward"):
        official_to_connector_keys(mlp, bim, proj)


def test_mlp_connector_is_cobra_projector(rng):
    conn = make_connector("mlp", (2, 3))
    shapes = {k: tuple(v.shape) for k, v in conn.state_dict().items()}
    assert shapes == {"projector.0.weight": (4 * VIS, VIS), "projector.0.bias": (4 * VIS,),
                      "projector.2.weight": (D_MODEL, 4 * VIS), "projector.2.bias": (D_MODEL,),
                      "projector.4.weight": (D_MODEL, D_MODEL), "projector.4.bias": (D_MODEL,)}
    x = rand(rng, 2, 6, VIS)
    sd = conn.state_dict()
    h = F.gelu(x @ sd["projector.0.weight"].T + sd["projector.0.bias"])
    h = F.gelu(h @ sd["projector.2.weight"].T + sd["projector.2.bias"])
    torch.testing.assert_close(conn(x), h @ sd["projector.4.weight"].T + sd["projector.4.bias"])


def test_orders_copied_to_device_once():
    # the fused op checks an orders tensor's values once per tensor and version: the connector
    # must hand it the same device copy every call, with a version counter (not an inference
    # tensor), and a new copy once the buffer is edited
    conn = make_connector("msc-csm", (3, 4), n_layers=1)
    meta = torch.device("meta")
    with torch.inference_mode():
        first = conn.orders_on(meta)
        assert not first.is_inference() and first.device == meta
        assert conn.orders_on(meta) is first
    assert conn.orders_on(torch.device("cpu")) is conn.orders
    with torch.no_grad():
        conn.orders.copy_(conn.orders.flip(1))
    assert conn.orders_on(meta) is not first
