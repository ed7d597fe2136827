/* Native kernels of collapselab.fast (loaded by native.py). SIMDLEN is replaced by native.py
   per target before compiling: 8 (AVX2) or 16 (AVX-512), the vector expf of libmvec. */
#include <math.h>
#pragma omp declare simd notinbranch simdlen(SIMDLEN)
extern float expf(float);

/* z (rows x n) += b (n); a = silu(z); z <- silu'(z) = s (1 + z (1 - s)), s = sigmoid(z). */
void bias_silu(float *restrict z, const float *restrict b, float *restrict a,
               long rows, long n) {
    for (long r = 0; r < rows; r++) {
        float *zr = z + r * n, *ar = a + r * n;
        #pragma omp simd
        for (long j = 0; j < n; j++) {
            float x = zr[j] + b[j];
            float s = 1.0f / (1.0f + expf(-x));
            ar[j] = x * s;
            zr[j] = s * (1.0f + x * (1.0f - s));
        }
    }
}

/* A 16 x 16 block transposed in registers: four perfect shuffles of the rows (row r, lane c
   go to row r', lane c' with the bits of r'c' those of rc rotated by one; four rotations swap
   r and c). */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int v16i __attribute__((vector_size(64)));

static inline void transpose16(v16 *r) {
    const v16i lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const v16i hi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    for (int stage = 0; stage < 4; stage++) {
        v16 s[16];
        for (int i = 0; i < 8; i++) {
            s[2 * i] = __builtin_shuffle(r[i], r[i + 8], lo);
            s[2 * i + 1] = __builtin_shuffle(r[i], r[i + 8], hi);
        }
        for (int i = 0; i < 16; i++) r[i] = s[i];
    }
}

/* at (n x rows) = a (rows x n) transposed, in 16 x 16 tiles, a column of tiles at a time:
   at's rows are then written one after another (a row of tiles at a time scatters the
   stores over all of at's rows: 3.4x slower). */
void transpose(const float *restrict a, float *restrict at, long rows, long n) {
    const long nq = n - n % 16, rq = rows - rows % 16;
    for (long c0 = 0; c0 < nq; c0 += 16)
        for (long r0 = 0; r0 < rq; r0 += 16) {
            v16 t[16];
            for (int i = 0; i < 16; i++) t[i] = *(const v16u *)(a + (r0 + i) * n + c0);
            transpose16(t);
            for (int i = 0; i < 16; i++) *(v16u *)(at + (c0 + i) * rows + r0) = t[i];
        }
    for (long j = 0; j < n; j++)  /* the remainders: last columns, last rows */
        for (long i = j < nq ? rq : 0; i < rows; i++) at[j * rows + i] = a[i * n + j];
}

/* bias_silu, then at = a transposed (the weight gradient's dense operand), while a is in
   L2. */
void bias_silu_t(float *restrict z, const float *restrict b, float *restrict a,
                 float *restrict at, long rows, long n) {
    bias_silu(z, b, a, rows, n);
    transpose(a, at, rows, n);
}

/* C[i][:] (+)= sum_k A[i*si + k*sk] B[k][:] for a tile of mr <= 6 rows and nv <= 4 vectors of
   16 columns: 24 accumulators in registers, B's rows loaded once per k, A broadcast. */
static inline __attribute__((always_inline)) void
gemm_tile(const float *restrict A, long si, long sk, const float *restrict B, long ldb,
          float *restrict C, long ldc, long K, const int mr, const int nv, int load) {
    v16 c[6][4];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nv; j++)
            c[i][j] = load ? *(const v16u *)(C + i * ldc + 16 * j) : (v16){0};
    for (long k = 0; k < K; k++) {
        v16 b[4];
        for (int j = 0; j < nv; j++) b[j] = *(const v16u *)(B + k * ldb + 16 * j);
        for (int i = 0; i < mr; i++) {
            const float s = A[i * si + k * sk];
            for (int j = 0; j < nv; j++) c[i][j] += s * b[j];
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nv; j++) *(v16u *)(C + i * ldc + 16 * j) = c[i][j];
}

#define TILE(MR, NV) gemm_tile(a, si, sk, b, ldb, c, ldc, kc, MR, NV, load)
#define ROWS(NV) switch (mr) { case 6: TILE(6, NV); break; case 5: TILE(5, NV); break; \
    case 4: TILE(4, NV); break; case 3: TILE(3, NV); break; case 2: TILE(2, NV); break; \
    default: TILE(1, NV); }

/* C (M x N, row stride ldc) (+)= op(A) B, B (K x N, row stride ldb), N a multiple of 16;
   op(A)[i][k] = A[i*si + k*sk]: (si, sk) = (lda, 1) for A, (1, lda) for A's transpose.
   Blocked: 128 rows of B by 64 columns (32 KiB) stay in L1 while every row tile of C passes. */
void gemm(const float *restrict A, long si, long sk, const float *restrict B, long ldb,
          float *restrict C, long ldc, long M, long K, long N, int accumulate) {
    for (long k0 = 0; k0 < K; k0 += 128) {
        const long kc = K - k0 < 128 ? K - k0 : 128;
        const int load = accumulate || k0 > 0;
        for (long j0 = 0; j0 < N; j0 += 64) {
            const int nv = (N - j0) >= 64 ? 4 : (int)((N - j0) / 16);
            const float *b = B + k0 * ldb + j0;
            for (long i0 = 0; i0 < M; i0 += 6) {
                const int mr = M - i0 < 6 ? (int)(M - i0) : 6;
                const float *a = A + i0 * si + k0 * sk;
                float *c = C + i0 * ldc + j0;
                switch (nv) { case 4: ROWS(4); break; case 3: ROWS(3); break;
                              case 2: ROWS(2); break; default: ROWS(1); }
            }
        }
    }
}

/* g (rows x n) *= d (if d is not NULL); gb (n) = column sums of g. */
void mul_colsum(float *restrict g, const float *restrict d, float *restrict gb,
                long rows, long n) {
    for (long j = 0; j < n; j++) gb[j] = 0.0f;
    for (long r = 0; r < rows; r++) {
        float *gr = g + r * n;
        if (d) {
            const float *dr = d + r * n;
            #pragma omp simd
            for (long j = 0; j < n; j++) { gr[j] *= dr[j]; gb[j] += gr[j]; }
        } else {
            #pragma omp simd
            for (long j = 0; j < n; j++) gb[j] += gr[j];
        }
    }
}

/* The output layer, of width d <= 16 (one vector: w's rows padded to 16 lanes), on the last
   activations a (rows x n), with the loss gradient: g = c ((a w + b) - e) (rows x d),
   gb = column sums of g, *sq = sum of g^2 (in double). w is n x d. Eight rows at a time in
   registers, like a GEMM kernel. */
static void out_rows(const float *restrict a, const v16 *restrict wp, const float *restrict b,
                     const float *restrict e, float *restrict g, float *restrict gb,
                     double *restrict sq, long m, long n, long d, float c) {
    v16 s[8] = {0};
    for (long k = 0; k < n; k++) {
        const v16 wk = wp[k];
        for (long i = 0; i < 8; i++) s[i] += a[i * n + k] * wk;
    }
    for (long i = 0; i < m; i++)
        for (long j = 0; j < d; j++) {
            float v = ((s[i][j] + b[j]) - e[i * d + j]) * c;
            g[i * d + j] = v;
            gb[j] += v;
            *sq += (double)v * v;
        }
}

void out_fwd(const float *restrict a, const float *restrict w, const float *restrict b,
             const float *restrict e, float *restrict g, float *restrict gb,
             float *restrict sq, long rows, long n, long d, float c) {
    v16 wp[n];
    double acc = 0.0;
    for (long k = 0; k < n; k++) {
        v16 t = {0};
        for (long j = 0; j < d; j++) t[j] = w[k * d + j];
        wp[k] = t;
    }
    for (long j = 0; j < d; j++) gb[j] = 0.0f;
    long r = 0;
    for (; r + 8 <= rows; r += 8)
        out_rows(a + r * n, wp, b, e + r * d, g + r * d, gb, &acc, 8, n, d, c);
    if (r < rows) {  /* the last rows, through a zero-padded copy */
        float tail[8 * n];
        for (long i = 0; i < 8 * n; i++) tail[i] = r * n + i < rows * n ? a[r * n + i] : 0.0f;
        out_rows(tail, wp, b, e + r * d, g + r * d, gb, &acc, rows - r, n, d, c);
    }
    *sq = (float)acc;
}

/* Back through the output layer (w: n x d, d <= 16, n a multiple of 16) into the hidden
   layer below it: gw (n x d) = a^T g; h = (g w^T) * silu', written over silu' (sh: rows x n,
   in: silu', out: h); gh (n) = column sums of h. */
void out_bwd(const float *restrict a, const float *restrict g, const float *restrict w,
             float *restrict sh, float *restrict gw, float *restrict gh,
             long rows, long n, long d) {
    const long nb = n / 16;
    v16 wt[d * nb], gwt[d * nb], ghv[nb];
    for (long j = 0; j < d; j++)
        for (long q = 0; q < nb; q++) {
            v16 t;
            for (long l = 0; l < 16; l++) t[l] = w[(q * 16 + l) * d + j];
            wt[j * nb + q] = t;
            gwt[j * nb + q] = (v16){0};
        }
    for (long q = 0; q < nb; q++) ghv[q] = (v16){0};
    for (long r = 0; r < rows; r++) {
        const float *gr = g + r * d;
        const v16u *ar = (const v16u *)(a + r * n);
        v16u *hr = (v16u *)(sh + r * n);
        for (long q = 0; q < nb; q++) {
            const v16 av = ar[q];
            v16 t = {0};
            for (long j = 0; j < d; j++) {
                gwt[j * nb + q] += av * gr[j];
                t += gr[j] * wt[j * nb + q];
            }
            const v16 h = t * hr[q];
            hr[q] = h;
            ghv[q] += h;
        }
    }
    for (long q = 0; q < nb; q++)
        for (long l = 0; l < 16; l++) {
            gh[q * 16 + l] = ghv[q][l];
            for (long j = 0; j < d; j++) gw[(q * 16 + l) * d + j] = gwt[j * nb + q][l];
        }
}

/* One chain's forward/backward of the DSM step of a SiLU MLP whose output layer is narrow
   (out_fwd / out_bwd), all in this library: what batched._forward_backward_2d computes with
   these kernels, in one call (the Python of ~20 calls per chain was ~0.08 ms). L weight
   layers; widths w[0..L], w[1..L-1] multiples of 16, w[L] <= 16; W[l] (w[l] x w[l+1]) and
   b[l] the weights, GW[l] and GB[l] their gradients; inp (rows x w[0]), eps (rows x w[L]);
   work space z[l], act[l] (rows x w[l+1], l < L - 1) and wt (w x w for the widest hidden
   layer); out (rows x w[L]) receives the loss gradient c (net - eps), sq its sum of squares. */
void mlp_fb(long L, const long *w, float *const *W, float *const *b, float *const *GW,
            float *const *GB, const float *inp, const float *eps, float *const *z,
            float *const *act, float *out, float *wt, float *sq, long rows, float c) {
    const float *a = inp;
    for (long l = 0; l + 1 < L; l++) {
        gemm(a, w[l], 1, W[l], w[l + 1], z[l], w[l + 1], rows, w[l], w[l + 1], 0);
        bias_silu(z[l], b[l], act[l], rows, w[l + 1]);
        a = act[l];
    }
    const long h = L - 2;  /* the last hidden layer */
    out_fwd(a, W[L - 1], b[L - 1], eps, out, GB[L - 1], sq, rows, w[L - 1], w[L], c);
    out_bwd(a, out, W[L - 1], z[h], GW[L - 1], GB[h], rows, w[L - 1], w[L]);
    float *g = z[h];  /* the loss gradient in layer h's pre-activation */
    for (long l = h; l >= 0; l--) {
        const float *x = l == 0 ? inp : act[l - 1];
        gemm(x, 1, w[l], g, w[l + 1], GW[l], w[l + 1], w[l], rows, w[l + 1], 0);  /* x^T g */
        if (l > 0) {  /* into the activation buffer of layer l - 1: last needed just above */
            transpose(W[l], wt, w[l], w[l + 1]);
            gemm(g, w[l + 1], 1, wt, w[l], act[l - 1], w[l], rows, w[l + 1], w[l], 0);
            mul_colsum(act[l - 1], z[l - 1], GB[l - 1], rows, w[l]);
            g = act[l - 1];
        }
    }
}

/* The update of a (rows x P) chain-major training state, one row per chain: clip the row's
   gradient to global norm max_norm (max_norm <= 0: no clipping; factor max_norm / (norm +
   1e-6), at most 1, as batched._clip_per_chain_), one Adam or AdamW step with torch's fused
   formulas (bias corrections of step `step`; wd: L2 in the gradient, or decoupled), then the
   EMA e = lerp(e, w, ew). One pass over the state instead of four (norm, scale, Adam, lerp):
   the state of three width-128 chains (2.5 MB) does not fit L2 beside the step's buffers. */
void adam_ema(float *restrict w, const float *restrict g, float *restrict m,
              float *restrict v, float *restrict e, long rows, long P, float max_norm,
              float lr, float beta1, float beta2, float eps, float wd, int decoupled,
              double step, float ew) {
    const double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
    const float step_size = (float)(lr / bc1), bc2s = (float)sqrt(bc2);
    const float c1 = 1.0f - beta1, c2 = 1.0f - beta2, shrink = 1.0f - lr * wd;
    const float l2 = decoupled ? 0.0f : wd;
    for (long r = 0; r < rows; r++) {
        float *wr = w + r * P, *mr = m + r * P, *vr = v + r * P, *er = e + r * P;
        const float *gr = g + r * P;
        float f = 1.0f;
        if (max_norm > 0.0f) {
            float s = 0.0f;
            #pragma omp simd reduction(+:s)
            for (long j = 0; j < P; j++) s += gr[j] * gr[j];
            const float fac = max_norm / (sqrtf(s) + 1e-6f);
            f = fac < 1.0f ? fac : 1.0f;
        }
        #pragma omp simd
        for (long j = 0; j < P; j++) {
            float wj = wr[j];
            const float gj = gr[j] * f + l2 * wj;
            if (decoupled) wj *= shrink;
            const float mj = mr[j] + c1 * (gj - mr[j]);
            const float vj = beta2 * vr[j] + c2 * gj * gj;
            wj -= step_size * mj / (sqrtf(vj) / bc2s + eps);
            mr[j] = mj;
            vr[j] = vj;
            wr[j] = wj;
            /* torch.lerp: from the nearer end */
            er[j] = ew < 0.5f ? er[j] + ew * (wj - er[j]) : wj - (wj - er[j]) * (1.0f - ew);
        }
    }
}
