/* Driver for tests/fast/test_native.py::test_kernels_clean_under_sanitizers: calls every kernel of
   collapselab.fast.native over many shapes (rows not a multiple of 8, widths with and without a
   vector remainder, every output width the output-layer kernels take; transposes with and
   without whole 16 x 16 tiles; the GEMM, the one-call forward/backward and the optimizer
   pass) and checks them
   against double-precision loops. Built with -fsanitize=address,undefined, so an
   out-of-bounds access or undefined behaviour stops it with a report. Prints "ok". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

void bias_silu(float *z, const float *b, float *a, long rows, long n);
void mul_colsum(float *g, const float *d, float *gb, long rows, long n);
void out_fwd(const float *a, const float *w, const float *b, const float *e, float *g,
             float *gb, float *sq, long rows, long n, long d, float c);
void out_bwd(const float *a, const float *g, const float *w, float *sh, float *gw, float *gh,
             long rows, long n, long d);
void transpose(const float *a, float *at, long rows, long n);
void gemm(const float *A, long si, long sk, const float *B, long ldb, float *C, long ldc,
          long M, long K, long N, int accumulate);
void mlp_fb(long L, const long *w, float *const *W, float *const *b, float *const *GW,
            float *const *GB, const float *inp, const float *eps, float *const *z,
            float *const *act, float *out, float *wt, float *sq, long rows, float c);
void adam_ema(float *w, const float *g, float *m, float *v, float *e, long rows, long P,
              float max_norm, float lr, float beta1, float beta2, float eps, float wd,
              int decoupled, double step, float ew);
void bias_silu_t(float *z, const float *b, float *a, float *at, long rows, long n);

static float *noise(long count) {  /* exact-size heap blocks: ASan sees any overrun */
    float *p = malloc((size_t)count * sizeof(float));
    for (long i = 0; i < count; i++) p[i] = (float)rand() / RAND_MAX * 2.0f - 1.0f;
    return p;
}

static int bad(double got, double want, double scale, const char *what, long r, long n, long d) {
    if (fabs(got - want) <= 1e-5 * scale) return 0;
    printf("%s wrong at rows=%ld n=%ld d=%ld: %g vs %g\n", what, r, n, d, got, want);
    return 1;
}

int main(void) {
    srand(7);
    for (long rows = 1; rows <= 41; rows += 4)
        for (long n = 16; n <= 64; n += 16)
            for (long d = 1; d <= 16; d++) {
                float *a = noise(rows * n), *w = noise(n * d), *b = noise(d), *e = noise(rows * d);
                float *sh = noise(rows * n), *sd = malloc(rows * n * sizeof(float));
                float *g = malloc(rows * d * sizeof(float)), *gb = malloc(d * sizeof(float));
                float *gw = malloc(n * d * sizeof(float)), *gh = malloc(n * sizeof(float)), sq;
                for (long i = 0; i < rows * n; i++) sd[i] = sh[i];
                out_fwd(a, w, b, e, g, gb, &sq, rows, n, d, 0.5f);
                out_bwd(a, g, w, sh, gw, gh, rows, n, d);
                double total = 0.0;
                for (long r = 0; r < rows; r++)
                    for (long j = 0; j < d; j++) {
                        double s = 0.0;
                        for (long k = 0; k < n; k++) s += (double)a[r * n + k] * w[k * d + j];
                        double v = (s + b[j] - e[r * d + j]) * 0.5;
                        total += v * v;
                        if (bad(g[r * d + j], v, n, "out_fwd g", rows, n, d)) return 1;
                    }
                if (bad(sq, total, 1.0 + total, "out_fwd loss", rows, n, d)) return 1;
                for (long r = 0; r < rows; r++)
                    for (long k = 0; k < n; k++) {
                        double s = 0.0;
                        for (long j = 0; j < d; j++) s += (double)g[r * d + j] * w[k * d + j];
                        if (bad(sh[r * n + k], s * sd[r * n + k], d, "out_bwd h", rows, n, d))
                            return 1;
                    }
                for (long k = 0; k < n; k++)
                    for (long j = 0; j < d; j++) {
                        double s = 0.0;
                        for (long r = 0; r < rows; r++) s += (double)a[r * n + k] * g[r * d + j];
                        if (bad(gw[k * d + j], s, rows, "out_bwd gw", rows, n, d)) return 1;
                    }
                free(a); free(w); free(b); free(e); free(sh); free(sd); free(g); free(gb);
                free(gw); free(gh);
            }
    for (long rows = 1; rows <= 9; rows++)
        for (long n = 1; n <= 40; n += 3) {
            float *z = noise(rows * n), *b = noise(n), *g = noise(rows * n);
            float *a = malloc(rows * n * sizeof(float)), *gb = malloc(n * sizeof(float));
            bias_silu(z, b, a, rows, n);
            mul_colsum(g, z, gb, rows, n);
            mul_colsum(g, NULL, gb, rows, n);
            free(z); free(b); free(g); free(a); free(gb);
        }
    /* the transposes: whole 16 x 16 tiles, remainders of rows and of columns, both */
    for (long rows = 1; rows <= 50; rows += 7)
        for (long n = 1; n <= 50; n += 7) {
            float *z = noise(rows * n), *b = noise(n), *z2 = malloc(rows * n * sizeof(float));
            float *a = malloc(rows * n * sizeof(float)), *a2 = malloc(rows * n * sizeof(float));
            float *at = malloc(rows * n * sizeof(float)), *at2 = malloc(rows * n * sizeof(float));
            for (long i = 0; i < rows * n; i++) z2[i] = z[i];
            bias_silu(z2, b, a2, rows, n);
            bias_silu_t(z, b, a, at, rows, n);
            transpose(a, at2, rows, n);
            for (long i = 0; i < rows; i++)
                for (long j = 0; j < n; j++)
                    if (a[i * n + j] != a2[i * n + j] || z[i * n + j] != z2[i * n + j]
                        || at[j * rows + i] != a[i * n + j] || at2[j * rows + i] != a[i * n + j]) {
                        printf("transpose wrong at rows=%ld n=%ld (%ld, %ld)\n", rows, n, i, j);
                        return 1;
                    }
            free(z); free(b); free(z2); free(a); free(a2); free(at); free(at2);
        }
    /* the GEMM, A and A transposed: row tiles with remainders, 1-5 vectors of columns, a
       reduction longer than one block of 128 */
    for (long M = 1; M <= 14; M += 3)
        for (long K = 1; K <= 140; K += 23)
            for (long N = 16; N <= 80; N += 16) {
                float *A = noise(M * K), *B = noise(K * N), *C = noise(M * N);
                for (int tr = 0; tr < 2; tr++) {
                    /* tr: A holds the K x M transpose, read as (si, sk) = (1, M) */
                    gemm(A, tr ? 1 : K, tr ? M : 1, B, N, C, N, M, K, N, 0);
                    for (long i = 0; i < M; i++)
                        for (long j = 0; j < N; j++) {
                            double s = 0.0;
                            for (long k = 0; k < K; k++)
                                s += (double)(tr ? A[k * M + i] : A[i * K + k]) * B[k * N + j];
                            if (bad(C[i * N + j], s, K, "gemm", M, K, N)) return 1;
                        }
                }
                free(A); free(B); free(C);
            }
    /* the one-call forward/backward (values are checked in Python; here: memory) */
    for (long rows = 1; rows <= 20; rows += 6) {
        long w[4] = {7, 16, 32, 3};
        float *W[3], *b[3], *GW[3], *GB[3], *z[2], *act[2];
        for (int l = 0; l < 3; l++) {
            W[l] = noise(w[l] * w[l + 1]); b[l] = noise(w[l + 1]);
            GW[l] = noise(w[l] * w[l + 1]); GB[l] = noise(w[l + 1]);
        }
        for (int l = 0; l < 2; l++) { z[l] = noise(rows * w[l + 1]); act[l] = noise(rows * w[l + 1]); }
        float *inp = noise(rows * 7), *eps = noise(rows * 3), *out = noise(rows * 3);
        float *wt = noise(16 * 32), sq;
        mlp_fb(3, w, W, b, GW, GB, inp, eps, z, act, out, wt, &sq, rows, 2.0f / rows);
        for (int l = 0; l < 3; l++) { free(W[l]); free(b[l]); free(GW[l]); free(GB[l]); }
        for (int l = 0; l < 2; l++) { free(z[l]); free(act[l]); }
        free(inp); free(eps); free(out); free(wt);
    }
    /* clipping + Adam + EMA, against the same formulas in double */
    for (long rows = 1; rows <= 3; rows++)
        for (long P = 1; P <= 40; P += 13) {
            float *w = noise(rows * P), *g = noise(rows * P), *m = noise(rows * P);
            float *v = noise(rows * P), *e = noise(rows * P), *w0 = noise(rows * P);
            for (long i = 0; i < rows * P; i++) { v[i] = fabsf(v[i]); w0[i] = w[i]; }
            float *m0 = malloc(rows * P * sizeof(float)), *v0 = malloc(rows * P * sizeof(float));
            for (long i = 0; i < rows * P; i++) { m0[i] = m[i]; v0[i] = v[i]; }
            adam_ema(w, g, m, v, e, rows, P, -1.0f, 0.01f, 0.9f, 0.999f, 1e-8f, 0.0f, 0, 3.0, 0.1f);
            for (long i = 0; i < rows * P; i++) {
                double mm = 0.9 * m0[i] + 0.1 * g[i], vv = 0.999 * v0[i] + 0.001 * g[i] * g[i];
                double ww = w0[i] - 0.01 / (1 - 0.729) * mm / (sqrt(vv) / sqrt(1 - pow(0.999, 3)) + 1e-8);
                if (bad(w[i], ww, 1.0, "adam_ema w", rows, P, 0)) return 1;
            }
            free(w); free(g); free(m); free(v); free(e); free(w0); free(m0); free(v0);
        }
    printf("ok\n");
    return 0;
}
