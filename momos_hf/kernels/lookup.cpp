// The MoMos lookup product on CPU: y[t, o] = scale[o] * sum_j table[t, j, mosaic[o, j]], where table[t, j, m] is
// input chunk j of row t (s values) dotted with motif m. `in * k` multiply-adds for the table and `out * in / s`
// additions for the sum, instead of the `out * in` multiply-adds of a dense product. Built by momos_hf/kernels/cpu.py.
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

enum { G = 8 };  // rows per group: the table holds one vector of G floats per (chunk, motif)
typedef float vec __attribute__((vector_size(G * sizeof(float)), aligned(4)));

// One row: table[j, m] vectorised over the motifs, then one sum per output in four independent chains.
template <typename Code, int S>
static void lookup_one(const float* x, const float* motifs_t, int64_t k, int64_t width, int64_t s_any, const Code* mosaic,
                       int64_t out, int64_t nb, const float* scale, float* table, float* y, bool parallel, int threads) {
  const int64_t s = S ? S : s_any;
  #pragma omp parallel num_threads(threads) if(parallel)
  {
    #pragma omp for schedule(static)
    for (int64_t j = 0; j < nb; j++) {
      const float* chunk = x + j * s;
      for (int64_t m = 0; m < k; m += G) {  // G motifs at a time, summed in a register
        vec acc = {0};
        for (int64_t i = 0; i < s; i++) acc += chunk[i] * *(const vec*)(motifs_t + i * width + m);
        *(vec*)(table + j * width + m) = acc;
      }
    }
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < out; o++) {
      const Code* codes = mosaic + o * nb;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;  // four chains: the adds do not wait on each other
      int64_t j = 0;
      for (; j + 4 <= nb; j += 4) {
        a0 += table[j * width + codes[j]];
        a1 += table[(j + 1) * width + codes[j + 1]];
        a2 += table[(j + 2) * width + codes[j + 2]];
        a3 += table[(j + 3) * width + codes[j + 3]];
      }
      for (; j < nb; j++) a0 += table[j * width + codes[j]];
      y[o] = (a0 + a1 + a2 + a3) * (scale ? scale[o] : 1.f);
    }
  }
}

// Up to G rows: inputs transposed to xg[i, t], table[j, m, :] and every sum vectorised over the G rows.
template <typename Code, int S>
static void lookup_group(const float* xg, int64_t rows, const float* motifs_t, int64_t k, int64_t width, int64_t s_any,
                         const Code* mosaic, int64_t out, int64_t nb, const float* scale, float* table, float* y,
                         bool parallel, int threads) {
  const int64_t s = S ? S : s_any;
  #pragma omp parallel num_threads(threads) if(parallel)
  {
    #pragma omp for schedule(static)
    for (int64_t j = 0; j < nb; j++)
      for (int64_t m = 0; m < k; m++) {
        vec acc = {0};
        for (int64_t i = 0; i < s; i++) acc += motifs_t[i * width + m] * *(const vec*)(xg + (j * s + i) * G);
        *(vec*)(table + (j * k + m) * G) = acc;
      }
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < out; o++) {
      const Code* codes = mosaic + o * nb;
      vec acc = {0};
      for (int64_t j = 0; j < nb; j++) acc += *(const vec*)(table + (j * k + (int64_t)codes[j]) * G);
      const float c = scale ? scale[o] : 1.f;
      for (int64_t t = 0; t < rows; t++) y[t * out + o] = acc[t] * c;
    }
  }
}

// x[rows, nb * s] (rows zero-padded to whole chunks), motifs[k, s], mosaic[out, nb], scale[out] or NULL -> y[rows, out].
template <typename Code, int S>
static void lookup(const float* x, int64_t rows, const float* motifs, int64_t k, int64_t s, const Code* mosaic,
                   int64_t out, int64_t nb, const float* scale, float* y, int threads) {
  const bool parallel = rows * out * nb > (1 << 14);  // below this, starting the threads costs more than they save
  const int64_t in = nb * s;
  // motifs_t[s, width]: the motifs transposed (the tables' inner loops read them contiguously), zero-padded to a
  // whole number of vectors
  const int64_t width = (k + G - 1) / G * G;
  float* motifs_t = (float*)calloc(s * width, sizeof(float));
  for (int64_t m = 0; m < k; m++)
    for (int64_t i = 0; i < s; i++) motifs_t[i * width + m] = motifs[m * s + i];
  float* table = (float*)malloc(sizeof(float) * nb * (rows == 1 ? width : k * G));
  if (rows == 1) {
    lookup_one<Code, S>(x, motifs_t, k, width, s, mosaic, out, nb, scale, table, y, parallel, threads);
  } else {
    float* xg = (float*)malloc(sizeof(float) * in * G);
    for (int64_t g = 0; g < rows; g += G) {
      const int64_t n = rows - g < G ? rows - g : G;
      for (int64_t i = 0; i < in; i++)
        for (int64_t t = 0; t < G; t++) xg[i * G + t] = t < n ? x[(g + t) * in + i] : 0.f;
      lookup_group<Code, S>(xg, n, motifs_t, k, width, s, mosaic, out, nb, scale, table, y + g * out, parallel, threads);
    }
    free(xg);
  }
  free(table);
  free(motifs_t);
}

// One entry per mosaic dtype; common block sizes get loops of fixed length the compiler unrolls.
#define ENTRY(NAME, CODE)                                                                                          \
  extern "C" void NAME(const float* x, int64_t rows, const float* motifs, int64_t k, int64_t s, const CODE* mosaic, \
                       int64_t out, int64_t nb, const float* scale, float* y, int threads) {                       \
    switch (s) {                                                                                                   \
      case 4: return lookup<CODE, 4>(x, rows, motifs, k, s, mosaic, out, nb, scale, y, threads);                  \
      case 8: return lookup<CODE, 8>(x, rows, motifs, k, s, mosaic, out, nb, scale, y, threads);                  \
      case 16: return lookup<CODE, 16>(x, rows, motifs, k, s, mosaic, out, nb, scale, y, threads);                \
      default: return lookup<CODE, 0>(x, rows, motifs, k, s, mosaic, out, nb, scale, y, threads);                 \
    }                                                                                                              \
  }
ENTRY(momos_lookup_u8, uint8_t)
ENTRY(momos_lookup_u16, uint16_t)
ENTRY(momos_lookup_i32, int32_t)
