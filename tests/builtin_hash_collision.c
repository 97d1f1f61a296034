/* Find two 8-byte token prefixes whose CPython tuple-hash states collide (parallel rho with
   distinguished points). Any common suffix then keeps the collision. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define P1 11400714785074694791ULL
#define P2 14029467366897019727ULL
#define P5 2870177450012600261ULL
#define ROT(x) (((x) << 31) | ((x) >> 33))
#define W 32
#define DPBITS 18
#define TBITS 22
static inline uint64_t f(uint64_t x) {
    uint64_t acc = P5;
    for (int i = 0; i < 8; i++) { acc += ((x >> (8 * i)) & 255) * P2; acc = ROT(acc); acc *= P1; }
    return acc;
}
static uint64_t seed = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void) { uint64_t z = (seed += 0x9E3779B97F4A7C15ULL); z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL; z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL; return z ^ (z >> 31); }
static uint64_t tdp[1 << TBITS], tstart[1 << TBITS], tlen[1 << TBITS];
static int resolve(uint64_t a, uint64_t la, uint64_t b, uint64_t lb) {
    while (la > lb) { a = f(a); la--; }
    while (lb > la) { b = f(b); lb--; }
    if (a == b) return 0;
    for (;;) { uint64_t na = f(a), nb = f(b); if (na == nb) { printf("%llu %llu %llu\n", (unsigned long long)a, (unsigned long long)b, (unsigned long long)na); return 1; } a = na; b = nb; }
}
int main(int argc, char **argv) {
    if (argc > 1) seed = strtoull(argv[1], 0, 10);
    uint64_t start[W], cur[W], len[W]; unsigned long long evals = 0;
    for (int w = 0; w < W; w++) { start[w] = cur[w] = rnd(); len[w] = 0; }
    for (;;) {
        for (int w = 0; w < W; w++) { cur[w] = f(cur[w]); len[w]++; }
        evals += W;
        for (int w = 0; w < W; w++) {
            if ((cur[w] >> (64 - DPBITS)) == 0) {
                uint64_t h = (cur[w] * P1) >> (64 - TBITS);
                while (tlen[h] && tdp[h] != cur[w]) h = (h + 1) & ((1 << TBITS) - 1);
                if (tlen[h] && tstart[h] != start[w]) {
                    if (resolve(tstart[h], tlen[h], start[w], len[w])) { fprintf(stderr, "evals %llu\n", evals); return 0; }
                } else if (!tlen[h]) { tdp[h] = cur[w]; tstart[h] = start[w]; tlen[h] = len[w]; }
                start[w] = cur[w] = rnd(); len[w] = 0;
            } else if (len[w] > (20u << DPBITS)) { start[w] = cur[w] = rnd(); len[w] = 0; }
        }
    }
}
