// The MoMos lookup product on CPU: y[t, o] = scale[o] * sum_j table[t, j, mosaic[o, j]], where table[t, j, m] is
// input chunk j of row t (s values) dotted with motif m. `in * k` multiply-adds for the table and `out * in / s`
// additions for the sum, instead of the `out * in` multiply-adds of a dense product. Built by momos_hf/kernels/cpu.py.
//
// A group of rows builds and sums its table one slice of chunks at a time, each slice (TABLE_BYTES) small enough to
// stay in the last-level cache while the sums gather from it: a whole group table (nb * k * G floats) outgrows the caches of
// large layers at small s, and the gathers then wait on memory.
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

constexpr int64_t G = 8;                 // rows per group: the table holds one vector of G floats per (chunk, motif)
constexpr int64_t TABLE_BYTES = 1 << 22;  // one slice of a group's table: the best of 256 KB, 1 MB and 4 MB measured
typedef float vec __attribute__((vector_size(G * sizeof(float)), aligned(4)));

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// One row: table[j, m] vectorised over the motifs (motifs_t is [s, width]), then each output's sum in four
// independent chains (the adds do not wait on each other). Its table (nb * width floats) is G times smaller than
// a group's and is built whole: slicing it measured slower.
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
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
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

// Up to G rows: inputs transposed to xg[i, t]; table[j, m, :] and every sum vectorised over the G rows.
template <typename Code, int S>
static void lookup_group(const float* xg, const float* motifs_t, int64_t k, int64_t width, int64_t s_any,
                         const Code* mosaic, int64_t out, int64_t nb, float* table, vec* sums, bool parallel, int threads) {
  const int64_t s = S ? S : s_any;
  const int64_t slice = TABLE_BYTES / (k * sizeof(vec)) > 1 ? TABLE_BYTES / (k * sizeof(vec)) : 1;
  for (int64_t j0 = 0; j0 < nb; j0 += slice) {
    const int64_t j1 = min64(nb, j0 + slice);
    #pragma omp parallel num_threads(threads) if(parallel)
    {
      #pragma omp for schedule(static)
      for (int64_t j = j0; j < j1; j++)
        for (int64_t m = 0; m < k; m++) {
          vec acc = {0};
          for (int64_t i = 0; i < s; i++) acc += motifs_t[i * width + m] * *(const vec*)(xg + (j * s + i) * G);
          *(vec*)(table + ((j - j0) * k + m) * G) = acc;
        }
      #pragma omp for schedule(static)
      for (int64_t o = 0; o < out; o++) {
        const Code* codes = mosaic + o * nb;
        vec acc = sums[o];
        for (int64_t j = j0; j < j1; j++) acc += *(const vec*)(table + ((j - j0) * k + (int64_t)codes[j]) * G);
        sums[o] = acc;
      }
    }
  }
}

// x[rows, nb * s] (rows zero-padded to whole chunks), motifs[k, s], mosaic[out, nb], scale[out] or NULL -> y[rows, out].
// Returns 0, or 1 where its scratch memory could not be allocated (nothing is computed then).
template <typename Code, int S>
static int lookup(const float* x, int64_t rows, const float* motifs, int64_t k, int64_t s, const Code* mosaic,
                  int64_t out, int64_t nb, const float* scale, float* y, int threads) {
  const bool parallel = rows * out * nb > (1 << 14);  // below this, starting the threads costs more than they save
  const int64_t in = nb * s;
  // motifs_t[s, width]: the motifs transposed (the tables' inner loops read them contiguously), zero-padded to a
  // whole number of vectors
  const int64_t width = (k + G - 1) / G * G;
  float* motifs_t = (float*)calloc(s * width, sizeof(float));
  float* table = (float*)malloc(rows == 1 ? nb * width * sizeof(float) : TABLE_BYTES + k * sizeof(vec));
  float* xg = (float*)malloc(sizeof(float) * in * G);
  vec* sums = (vec*)malloc(sizeof(vec) * out);
  if (!motifs_t || !table || !xg || !sums) {
    free(sums);
    free(xg);
    free(table);
    free(motifs_t);
    return 1;
  }
  for (int64_t m = 0; m < k; m++)
    for (int64_t i = 0; i < s; i++) motifs_t[i * width + m] = motifs[m * s + i];
  if (rows == 1) {
    lookup_one<Code, S>(x, motifs_t, k, width, s, mosaic, out, nb, scale, table, y, parallel, threads);
  } else {
    for (int64_t g = 0; g < rows; g += G) {
      const int64_t n = min64(rows - g, G);
      for (int64_t i = 0; i < in; i++)
        for (int64_t t = 0; t < G; t++) xg[i * G + t] = t < n ? x[(g + t) * in + i] : 0.f;
      for (int64_t o = 0; o < out; o++) sums[o] = (vec){0};
      lookup_group<Code, S>(xg, motifs_t, k, width, s, mosaic, out, nb, table, sums, parallel, threads);
      for (int64_t o = 0; o < out; o++)
        for (int64_t t = 0; t < n; t++) y[(g + t) * out + o] = sums[o][t] * (scale ? scale[o] : 1.f);
    }
  }
  free(sums);
  free(xg);
  free(table);
  free(motifs_t);
  return 0;
}

// One entry per mosaic dtype; common block sizes get loops of fixed length the compiler unrolls.
#define ENTRY(NAME, CODE)                                                                                          \
  extern "C" int NAME(const float* x, int64_t rows, const float* motifs, int64_t k, int64_t s, const CODE* mosaic,  \
                      int64_t out, int64_t nb, const float* scale, float* y, int threads) {                        \
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
