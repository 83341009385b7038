/* The k-th largest score of every row, for top-K evaluation on the CPU (trainer/kth_kernel.py).
 *
 * One pass over a row folds it into `width` strided groups (column c belongs to group c % width)
 * and keeps every group's maximum: an element-wise max the compiler vectorises, so the pass runs
 * at memory speed. The kmax-th largest group maximum `bound` is at most the kmax-th largest score
 * (kmax distinct scores are >= it), so the row's top kmax all lie, >= bound, in a group whose
 * maximum is >= bound, or in the tail past the last whole fold. Only those few scores, still in
 * cache, go through a small insertion sort. NaN scores are never counted among the top.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define FOLD 64 /* scores per group: fewer, larger groups make `bound` cheap (docs/performance.md) */

/* Offer x to top[0..*filled), the k largest so far in descending order. */
static void offer(float x, float *top, int64_t *filled, int64_t k) {
    if (*filled == k && !(x > top[k - 1])) return;
    if (x != x) return;
    int64_t p = *filled < k ? (*filled)++ : k - 1;
    while (p > 0 && top[p - 1] < x) {
        top[p] = top[p - 1];
        p--;
    }
    top[p] = x;
}

/* out[r * nk + i] = the ks[i]-th largest of row r (NaN where the row has fewer non-NaN scores).
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int kth_largest_f32(const float *scores, int64_t rows, int64_t cols, const int64_t *ks, int64_t nk,
                    int64_t kmax, float *out) {
    int64_t width = cols / FOLD;
    int64_t folds = width >= kmax ? cols / width : 0; /* 0: rows too narrow to fold, scan them whole */
    float *group_max = malloc(sizeof(float) * (width > 0 ? width : 1));
    float *top = malloc(sizeof(float) * kmax);
    if (!group_max || !top) {
        free(group_max);
        free(top);
        return -1;
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *row = scores + r * cols;
        int64_t filled = 0, tail = 0;
        if (folds) {
            for (int64_t c = 0; c < width; c++) group_max[c] = -INFINITY;
            for (int64_t f = 0; f < folds; f++) {
                const float *x = row + f * width;
                for (int64_t c = 0; c < width; c++) group_max[c] = x[c] > group_max[c] ? x[c] : group_max[c];
            }
            for (int64_t c = 0; c < width; c++) offer(group_max[c], top, &filled, kmax);
            float bound = filled == kmax ? top[kmax - 1] : -INFINITY;
            filled = 0;
            for (int64_t c = 0; c < width; c++) {
                if (!(group_max[c] >= bound)) continue;
                for (int64_t f = 0; f < folds; f++)
                    if (row[f * width + c] >= bound) offer(row[f * width + c], top, &filled, kmax);
            }
            tail = folds * width;
        }
        for (int64_t c = tail; c < cols; c++) offer(row[c], top, &filled, kmax);
        for (int64_t i = 0; i < nk; i++) out[r * nk + i] = ks[i] <= filled ? top[ks[i] - 1] : NAN;
    }
    free(group_max);
    free(top);
    return 0;
}
