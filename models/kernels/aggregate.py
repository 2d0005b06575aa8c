"""Triton kernels of the fused context aggregation (see models/fused.py for what they compute).

Imported on first use. Triton reads ``TRITON_INTERPRET`` when it is first imported, so the tests run
these kernels in a child process started with it set.
"""
import triton
import triton.language as tl


@triton.jit
def _gelu(z):
    return 0.5 * z * (1 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _dwconv(x_ptr, w_ptr, b, h, ws, cs, wm, cm, H, W, sxb, sxh, sxw, sxc,
            K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # Depth-wise K x K convolution with zero padding K // 2 at row h, columns ws, channels cs.
    z = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(K):
        hh = h + i - K // 2
        row_ok = (hh >= 0) & (hh < H)
        for j in tl.static_range(K):
            ww = ws + j - K // 2
            m = (ww >= 0) & (ww < W) & wm & row_ok
            xv = tl.load(x_ptr + b * sxb + hh * sxh + ww[:, None] * sxw + cs[None, :] * sxc,
                         mask=m[:, None] & cm[None, :], other=0.)
            wv = tl.load(w_ptr + cs * (K * K) + (i * K + j), mask=cm, other=0.)
            z += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return z


@triton.jit
def level_fwd(x_ptr, w_ptr, g_ptr, acc_ptr, y_ptr, sum_ptr, H, W, C,
              sxb, sxh, sxw, sxc, sgb, sgh, sgw,
              K: tl.constexpr, HAS_ACC: tl.constexpr, STORE_Y: tl.constexpr, DO_SUM: tl.constexpr,
              BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # y = GELU(dwconv(x)); acc (+)= g * y; optionally store y and add its column sums to sum.
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    ws = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wm = ws < W
    cm = cs < C
    m2 = wm[:, None] & cm[None, :]
    y = _gelu(_dwconv(x_ptr, w_ptr, b, h, ws, cs, wm, cm, H, W, sxb, sxh, sxw, sxc,
                      K, BLOCK_W, BLOCK_C))
    off = ((b * H + h) * W + ws[:, None]) * C + cs[None, :]
    if STORE_Y:
        y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + off, y, mask=m2)
        y = y.to(tl.float32)  # the next level and the gating see the stored (rounded) values
    g = tl.load(g_ptr + b * sgb + h * sgh + ws * sgw, mask=wm, other=0.).to(tl.float32)
    acc = y * g[:, None]
    if HAS_ACC:
        acc += tl.load(acc_ptr + off, mask=m2, other=0.)
    tl.store(acc_ptr + off, acc, mask=m2)
    if DO_SUM:
        tl.atomic_add(sum_ptr + b * C + cs, tl.sum(tl.where(m2, y, 0.), axis=0), mask=cm)


@triton.jit
def global_fwd(acc_ptr, g_ptr, glob_ptr, out_ptr, H, W, C, sgb, sgh, sgw, scale,
               BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # out = (acc + g * glob[b, c]) * scale, in the output's dtype.
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    ws = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wm = ws < W
    cm = cs < C
    m2 = wm[:, None] & cm[None, :]
    off = ((b * H + h) * W + ws[:, None]) * C + cs[None, :]
    g = tl.load(g_ptr + b * sgb + h * sgh + ws * sgw, mask=wm, other=0.).to(tl.float32)
    glob = tl.load(glob_ptr + b * C + cs, mask=cm, other=0.)
    out = (tl.load(acc_ptr + off, mask=m2, other=0.) + g[:, None] * glob[None, :]) * scale
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def level_bwd(x_ptr, w_ptr, g_ptr, dout_ptr, up_ptr, upvec_ptr, dz_ptr, dg_ptr, H, W, C,
              sxb, sxh, sxw, sxc, sgb, sgh, sgw, sdb, sdh, sdw,
              K: tl.constexpr, HAS_UP: tl.constexpr, HAS_UPVEC: tl.constexpr,
              BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # Recompute z = dwconv(x), y = GELU(z). Gradient into y: dout * g (+ up map) (+ up vector);
    # store dz = dy * GELU'(z) and add sum_c dout * y to the gate's gradient dg.
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    ws = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wm = ws < W
    cm = cs < C
    m2 = wm[:, None] & cm[None, :]
    z = _dwconv(x_ptr, w_ptr, b, h, ws, cs, wm, cm, H, W, sxb, sxh, sxw, sxc, K, BLOCK_W, BLOCK_C)
    cdf = 0.5 * (1 + tl.erf(z * 0.7071067811865476))
    y = z * cdf
    # The forward pass gated the stored (rounded) level output; so does this gradient.
    y = y.to(dz_ptr.dtype.element_ty).to(tl.float32)
    off = ((b * H + h) * W + ws[:, None]) * C + cs[None, :]
    dout = tl.load(dout_ptr + off, mask=m2, other=0.).to(tl.float32)
    g = tl.load(g_ptr + b * sgb + h * sgh + ws * sgw, mask=wm, other=0.).to(tl.float32)
    dy = dout * g[:, None]
    if HAS_UP:
        dy += tl.load(up_ptr + off, mask=m2, other=0.).to(tl.float32)
    if HAS_UPVEC:
        dy += tl.load(upvec_ptr + b * C + cs, mask=cm, other=0.)[None, :]
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    dz = dy * (cdf + z * pdf)
    tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
    tl.atomic_add(dg_ptr + b * sdb + h * sdh + ws * sdw, tl.sum(tl.where(m2, dout * y, 0.), axis=1),
                  mask=wm)
