/* Driver for tests/test_native.py::test_kernels_clean_under_sanitizers: calls every kernel of
   collapselab.native over many shapes (rows not a multiple of 8, widths with and without a
   vector remainder, every output width the output-layer kernels take; transposes with and
   without whole 16 x 16 tiles) and checks them
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
    printf("ok\n");
    return 0;
}
