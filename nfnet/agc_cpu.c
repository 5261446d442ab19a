/* AGC (Brock et al. 2021, Eq. 3) for fp32 tensors on the CPU in one pass over memory: for each unit, the norms
 * of W_i and G_i are summed together, and G_i is rescaled while it is still in L1. Torch ops need one pass per
 * norm and a third over the clipping units; CPU clipping is memory-bound, so passes are what cost.
 *
 * A unit is a contiguous run of `len[t]` floats; tensor t holds `units[t]` of them back to back (rows of a
 * contiguous or channels_last weight, or one unit for a gain/bias). This call handles units
 * [begin, end) of the concatenation of all tensors, so threads can split the work anywhere. */
#include <math.h>
#include <stdint.h>

#define CHUNK 256 /* floats summed in float lanes before they are added to the double total */

static void sumsq2(const float *w, const float *g, int64_t n, double *sw, double *sg)
{
    double tw = 0.0, tg = 0.0;
    for (int64_t k0 = 0; k0 < n; k0 += CHUNK) {
        int64_t k1 = n - k0 < CHUNK ? n : k0 + CHUNK;
        float aw = 0.0f, ag = 0.0f;
#pragma omp simd reduction(+ : aw, ag)
        for (int64_t k = k0; k < k1; k++) {
            aw += w[k] * w[k];
            ag += g[k] * g[k];
        }
        tw += aw;
        tg += ag;
    }
    *sw = tw;
    *sg = tg;
}

void agc_clip_f32(int64_t n_tensors, const float *const *w, float *const *g, const int64_t *units,
                  const int64_t *len, int64_t begin, int64_t end, float lam, float eps, float *g_norm,
                  float *factor)
{
    int64_t base = 0;
    for (int64_t t = 0; t < n_tensors && base < end; base += units[t], t++) {
        int64_t r0 = begin > base ? begin - base : 0;
        int64_t r1 = end - base < units[t] ? end - base : units[t];
        for (int64_t r = r0; r < r1; r++) {
            const float *wr = w[t] + r * len[t];
            float *gr = g[t] + r * len[t];
            double sw, sg;
            sumsq2(wr, gr, len[t], &sw, &sg);
            float wn = (float)sqrt(sw), gn = (float)sqrt(sg);
            float max_norm = lam * (wn > eps ? wn : eps);
            float f = 1.0f;
            if (gn > max_norm) { /* NaN norms compare false and are left alone, as the torch path does */
                f = max_norm / (gn > 1e-6f ? gn : 1e-6f);
#pragma omp simd
                for (int64_t k = 0; k < len[t]; k++)
                    gr[k] *= f;
            }
            g_norm[base + r] = gn;
            factor[base + r] = f;
        }
    }
}
