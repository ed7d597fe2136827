/* The float32 FMA peak of one core, for bench_batched.py's context line: ten independent
   chains of 512-bit (or, built for AVX2, 256-bit) fused multiply-adds, enough to cover the
   FMA latency on every current x86 core. Prints GFLOP/s. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef float vf __attribute__((vector_size(VBYTES)));

int main(int argc, char **argv) {
    const long n = argc > 1 ? atol(argv[1]) : 200000000L;
    vf a[10], b = (vf){} + 1.0000001f, c = (vf){} + 1e-7f;
    for (int i = 0; i < 10; i++) a[i] = (vf){} + (float)i;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < n; k++) {
        a[0] = a[0] * b + c; a[1] = a[1] * b + c; a[2] = a[2] * b + c; a[3] = a[3] * b + c;
        a[4] = a[4] * b + c; a[5] = a[5] * b + c; a[6] = a[6] * b + c; a[7] = a[7] * b + c;
        a[8] = a[8] * b + c; a[9] = a[9] * b + c;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    vf sum = a[0];
    for (int i = 1; i < 10; i++) sum += a[i];
    printf("%.2f %g\n", n * 10.0 * 2 * (VBYTES / 4) / s / 1e9, (double)sum[0]);
    return 0;
}
