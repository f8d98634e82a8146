/* The input pipeline's one compiled pass: a shuffle window's rows -> a block of ready batches
 * (gather in shuffled order, id hashing, KJT layout, dense rows, per-batch counters), plus the window
 * permutation.
 *
 * Built by `make install` (pipeline/native.py builds it on first use when missing) and loaded with
 * ctypes; tests/pipeline/test_native.py checks it against a row-by-row Python reference. Pure C99
 * plus gcc/clang's unsigned __int128 and __builtin_prefetch: no Python or torch headers, < 1 s to build.
 *
 * Hashing is the one of pipeline/ids.py: splitmix64(id) mod vocab_size, bit for bit. The modulo is
 * computed by multiplying with a precomputed reciprocal (libdivide's unsigned 64-bit algorithm,
 * exact for every divisor >= 1), ~2 ns per id instead of ~5 ns for a hardware divide.
 */
#include <math.h>
#include <stdint.h>

static inline uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z;
}

typedef struct {
    uint64_t d, magic; /* magic 0: d is a power of two, q = n >> more */
    unsigned more;     /* shift, | 0x40 when the add-indicator path is needed */
} divisor;

static divisor divisor_of(uint64_t d) {
    divisor v = {d, 0, 0};
    unsigned lg = 63u - (unsigned)__builtin_clzll(d);
    if ((d & (d - 1)) == 0) {
        v.more = lg;
        return v;
    }
    unsigned __int128 num = (unsigned __int128)1 << (64 + lg);
    uint64_t m = (uint64_t)(num / d), rem = (uint64_t)(num % d);
    if (d - rem < (1ULL << lg)) {
        v.more = lg;
    } else {
        uint64_t twice = rem + rem;
        m += m;
        if (twice >= d || twice < rem) m += 1;
        v.more = lg | 0x40u;
    }
    v.magic = m + 1;
    return v;
}

static inline uint64_t mod_by(uint64_t n, const divisor *v) {
    uint64_t q;
    if (!v->magic) {
        q = n >> v->more;
    } else {
        q = (uint64_t)(((unsigned __int128)v->magic * n) >> 64);
        if (v->more & 0x40u) {
            q = (((n - q) >> 1) + q) >> (v->more & 0x3fu);
        } else {
            q >>= v->more;
        }
    }
    return n - q * v->d;
}

/* out[i] = mix64(ids[i]) mod d for i < n. */
void rm_hash_mod(const int64_t *ids, int64_t n, uint64_t d, int64_t *out) {
    divisor v = divisor_of(d);
    for (int64_t i = 0; i < n; i++) out[i] = (int64_t)mod_by(mix64((uint64_t)ids[i]), &v);
}

/* How one feature's ids are mapped: copied (d 0), or mix64(x) mod d, read from `memo` (the mapped
 * values of x in [0, memo_n), pipeline/ids.py's memo table) when it is given and x is small. */
typedef struct {
    uint64_t d, memo_n;
    const int64_t *memo;
} mapping;

static inline int64_t map_id(int64_t x, const mapping *mp, const divisor *v) {
    if (mp->memo && (uint64_t)x < mp->memo_n) return mp->memo[x];
    return (int64_t)mod_by(mix64((uint64_t)x), v);
}

/* Where each of the n_real output rows comes from: part[i] (the window's slice holding window row
 * order[i]) and local[i] (its row inside that slice); the window's P slices start at part_start[0..P]. */
static void locate(int64_t n_real, const int64_t *order, int64_t n_parts, const int64_t *part_start, int64_t *part,
                   int64_t *local) {
    for (int64_t i = 0; i < n_real; i++) {
        int64_t p = 0;
        while (p + 1 < n_parts && order[i] >= part_start[p + 1]) p++;
        part[i] = p;
        local[i] = order[i] - part_start[p];
    }
}

#define PF 48 /* rows a software prefetch runs ahead of a gather */

/* Read one int64 per cache line of a[0 .. n): pulls a column fresh from the decoder (another core)
 * into this core's cache in address order, which the hardware prefetcher streams, before a gather
 * visits it in random order (measured: ~15% less time in rm_fill_sparse). The sum goes to `sink` so
 * that the reads are not optimised away. */
static volatile int64_t sink;
static int64_t stream(const int64_t *a, int64_t n) {
    int64_t acc = 0;
    for (int64_t k = 0; k < n; k += 8) acc += a[k];
    return acc;
}

static inline int64_t clip(int64_t m, int64_t lo, int64_t hi) { return m < lo ? lo : (m > hi ? hi : m); }

/* The column of feature s (ids or offsets) in the slice holding output row i (needs part, n_parts). */
#define SRC(arr, s, i) ((const int64_t *)(uintptr_t)(arr)[(s) * n_parts + part[i]])

/* Plan a block of nb batches of bsz rows whose real rows are the window rows order[0 .. n_real)
 * (batch j holds order[j*bsz .. j*bsz + m_j)): into plan (2 x n_real + nb x s_total + 1 int64) go
 * where every output row comes from (part, local: its slice and its row there) and where the ids of
 * every (batch, feature) start in the block's values, then their total, which is returned.
 * part_start, offsets and max_len as in rm_fill_sparse. */
int64_t rm_plan_block(int64_t nb, int64_t bsz, int64_t n_real, const int64_t *order, int64_t s_total, int64_t n_parts,
                      const int64_t *part_start, const uint64_t *offsets, const int64_t *max_len, int64_t *plan) {
    int64_t *part = plan, *local = plan + n_real, *start = plan + 2 * n_real, pos = 0;
    locate(n_real, order, n_parts, part_start, part, local);
    for (int64_t j = 0; j < nb; j++) {
        const int64_t r0 = j * bsz, m = clip(n_real - r0, 0, bsz);
        for (int64_t s = 0; s < s_total; s++) {
            start[j * s_total + s] = pos;
            if (!m || !offsets[s * n_parts]) {
                pos += m;
                continue;
            }
            for (int64_t i = r0; i < r0 + m; i++) {
                const int64_t *off = SRC(offsets, s, i);
                pos += clip(off[local[i] + 1] - off[local[i]], 0, max_len[s]);
            }
        }
    }
    start[nb * s_total] = pos;
    return pos;
}

/* The sparse part of a block planned by rm_plan_block (see pipeline/convert.py, fill_block).
 *
 *   part_start  n_parts + 1 window rows: the window is n_parts slices (decoded row groups), slice p
 *               holding window rows [part_start[p], part_start[p + 1])
 *   ids         s_total x n_parts addresses: feature s's int64 ids in slice p
 *   offsets     s_total x n_parts: all 0 for a feature with one id per row (row r of slice p: ids[r]);
 *               else addresses of int64 offsets, row r's ids being ids[offsets[r] .. offsets[r + 1]),
 *               of which the last max_len[s] are kept
 *   vocab       per feature: 0 -> copy the ids, > 0 -> hash them into [0, vocab)
 *   memo        per feature: address of its memo table (ids [0, memo_n) already mapped), or 0
 * Writes values (batch-major, key-major inside a batch; room for `cap` ids), lengths (nb x s_total x bsz
 * int32, padding rows 0) and voff (nb + 1 offsets of each batch's ids). Returns the number of ids
 * written, or -1 (nothing written) when they would not fit in cap.
 *
 * Feature by feature: one feature's source ids and memo table stay in cache while all batches are
 * written; its columns are first streamed in address order (they are fresh from the decoder, and the
 * gathers below visit them in random order, which the hardware prefetcher cannot follow). */
int64_t rm_fill_sparse(int64_t nb, int64_t bsz, int64_t n_real, int64_t s_total, int64_t n_parts,
                       const int64_t *part_start, const uint64_t *ids, const uint64_t *offsets, const int64_t *max_len,
                       const uint64_t *vocab, const uint64_t *memo, uint64_t memo_n, const int64_t *plan,
                       int64_t *values, int64_t cap, int32_t *lengths, int64_t *voff) {
    const int64_t *part = plan, *local = plan + n_real, *start = plan + 2 * n_real;
    if (start[nb * s_total] > cap) return -1;
    for (int64_t j = 0; j < nb; j++) voff[j] = start[j * s_total];
    voff[nb] = start[nb * s_total];
    for (int64_t s = 0; s < s_total; s++) {
        const mapping mp = {vocab[s], memo_n, (const int64_t *)(uintptr_t)memo[s]};
        const divisor v = divisor_of(mp.d ? mp.d : 1);
        for (int64_t p = 0; p < n_parts; p++) {
            const int64_t rows = part_start[p + 1] - part_start[p];
            const int64_t *src = (const int64_t *)(uintptr_t)ids[s * n_parts + p];
            const int64_t *off = (const int64_t *)(uintptr_t)offsets[s * n_parts + p];
            if (off) {
                sink += stream(off, rows + 1);
                sink += stream(src + off[0], off[rows] - off[0]);
            } else {
                sink += stream(src, rows);
            }
        }
        for (int64_t j = 0; j < nb; j++) {
            const int64_t r0 = j * bsz, m = clip(n_real - r0, 0, bsz), end = r0 + m, last = n_real - 1;
            int64_t *dst = values + start[j * s_total + s];
            int32_t *lens = lengths + (j * s_total + s) * bsz;
            for (int64_t i = m; i < bsz; i++) lens[i] = 0;
            if (!offsets[s * n_parts]) {
                for (int64_t i = 0; i < m; i++) lens[i] = 1;
                if (mp.memo) {  /* memo entries are random reads: prefetch the one PF rows ahead */
                    for (int64_t i = r0; i < end; i++) {
                        const int64_t f = i + PF < last ? i + PF : last;
                        const uint64_t x = (uint64_t)SRC(ids, s, f)[local[f]];
                        __builtin_prefetch(mp.memo + (x < mp.memo_n ? x : 0));
                        *dst++ = map_id(SRC(ids, s, i)[local[i]], &mp, &v);
                    }
                } else if (mp.d) {
                    for (int64_t i = r0; i < end; i++) *dst++ = map_id(SRC(ids, s, i)[local[i]], &mp, &v);
                } else {
                    for (int64_t i = r0; i < end; i++) *dst++ = SRC(ids, s, i)[local[i]];
                }
                continue;
            }
            for (int64_t i = r0; i < end; i++) {
                /* rows come in random order: prefetch the ids of the row PF ahead, and the offsets of
                 * the row 2 PF ahead (measured: ~10% faster on data fresh from the decoder) */
                const int64_t f1 = i + PF < last ? i + PF : last, f2 = i + 2 * PF < last ? i + 2 * PF : last;
                __builtin_prefetch(SRC(ids, s, f1) + SRC(offsets, s, f1)[local[f1]]);
                __builtin_prefetch(SRC(offsets, s, f2) + local[f2]);
                const int64_t *src = SRC(ids, s, i), *off = SRC(offsets, s, i) + local[i];
                const int64_t b = off[1], a = b - clip(b - off[0], 0, max_len[s]);
                lens[i - r0] = (int32_t)(b - a);
                if (!mp.d) {
                    for (int64_t k = a; k < b; k++) *dst++ = src[k];
                } else {
                    for (int64_t k = a; k < b; k++) *dst++ = map_id(src[k], &mp, &v);
                }
            }
        }
    }
    return voff[nb];
}

/* The per-row part of a block of nb batches of bsz rows: dense values, labels, weights, user and row
 * ids in output order (batch j holds order[j*bsz .. j*bsz + m_j)), padding rows after them (zero
 * dense values, labels and weight, user id 0, row id -1), and per-batch counters.
 *
 *   dense     n_dense x n_parts addresses of float32 columns; non-finite values (missing: null, NaN,
 *             inf) are written as NaN, for the model's dense input to fill, and counted in
 *             stats[j][i_nonfinite]
 *   labels    n_labels x n_parts addresses of float32 columns
 *   user      n_parts addresses of int64 user ids (0: user id 0)
 *   row       n_parts addresses of int64 row ids (0: no row-id column, row id -1)
 *   stats     nb x n_stats int64: sets i_nonfinite, i_padded (padding rows), i_rows (real rows) and
 *             i_checksum (sum of mix64(row id) mod 2**64 of the real rows) of each batch
 *   plan      from rm_plan_block */
void rm_fill_rows(int64_t nb, int64_t bsz, int64_t n_real, const int64_t *plan, int64_t n_parts,
                  const int64_t *part_start, int64_t n_dense, const uint64_t *dense, int64_t n_labels,
                  const uint64_t *labels, const uint64_t *user, const uint64_t *row, float *dense_out,
                  float *labels_out, float *weights_out, int64_t *user_out, int64_t *row_out, int64_t *stats,
                  int64_t n_stats, int64_t i_nonfinite, int64_t i_padded, int64_t i_rows, int64_t i_checksum) {
    const int64_t *part = plan, *local = plan + n_real;
    for (int64_t p = 0; p < n_parts; p++) {  /* as in rm_fill_sparse: stream the columns in first */
        const int64_t rows = part_start[p + 1] - part_start[p];
        for (int64_t f = 0; f < n_dense; f++) sink += stream((const int64_t *)(uintptr_t)dense[f * n_parts + p], rows / 2);
        for (int64_t k = 0; k < n_labels; k++) sink += stream((const int64_t *)(uintptr_t)labels[k * n_parts + p], rows / 2);
        if (user[p]) sink += stream((const int64_t *)(uintptr_t)user[p], rows);
        if (row[p]) sink += stream((const int64_t *)(uintptr_t)row[p], rows);
    }
    for (int64_t j = 0; j < nb; j++) {
        const int64_t r0 = j * bsz, m = clip(n_real - r0, 0, bsz);
        int64_t nonfinite = 0;
        uint64_t checksum = 0;
        /* column by column: each source column stays in cache while the batch's rows are gathered */
        for (int64_t f = 0; f < n_dense; f++) {
            const uint64_t *col = dense + f * n_parts;
            for (int64_t i = r0; i < r0 + m; i++) {
                const float x = ((const float *)(uintptr_t)col[part[i]])[local[i]];
                const int bad = !isfinite(x);
                nonfinite += bad;
                dense_out[i * n_dense + f] = bad ? NAN : x;
            }
        }
        for (int64_t k = 0; k < n_labels; k++) {
            const uint64_t *col = labels + k * n_parts;
            for (int64_t i = r0; i < r0 + m; i++) labels_out[i * n_labels + k] = ((const float *)(uintptr_t)col[part[i]])[local[i]];
        }
        for (int64_t i = r0; i < r0 + m; i++) {
            const int64_t p = part[i], r = local[i];
            weights_out[i] = 1.0f;
            user_out[i] = user[p] ? ((const int64_t *)(uintptr_t)user[p])[r] : 0;
            if (row[p]) {
                row_out[i] = ((const int64_t *)(uintptr_t)row[p])[r];
                checksum += mix64((uint64_t)row_out[i]);
            } else {
                row_out[i] = -1;
            }
        }
        for (int64_t i = r0 + m; i < r0 + bsz; i++) {
            for (int64_t f = 0; f < n_dense; f++) dense_out[i * n_dense + f] = 0.0f;
            for (int64_t k = 0; k < n_labels; k++) labels_out[i * n_labels + k] = 0.0f;
            weights_out[i] = 0.0f;
            user_out[i] = 0;
            row_out[i] = -1;
        }
        int64_t *st = stats + j * n_stats;
        for (int64_t c = 0; c < n_stats; c++) st[c] = 0;
        st[i_nonfinite] = nonfinite;
        st[i_padded] = bsz - m;
        st[i_rows] = m;
        st[i_checksum] = (int64_t)checksum;
    }
}

/* A permutation of 0 .. n-1 into out, determined by the key words: Fisher-Yates driven by a
 * splitmix64 stream seeded with the folded key. Bounded draws take the high word of r * (i + 1)
 * (bias < n / 2**64, negligible). */
void rm_permutation(int64_t n, const uint64_t *key, int64_t n_key, int64_t *out) {
    uint64_t state = 0;
    for (int64_t k = 0; k < n_key; k++) state = mix64(state ^ key[k]);
    for (int64_t i = 0; i < n; i++) out[i] = i;
    for (int64_t i = n - 1; i > 0; i--) {
        state += 0x9E3779B97F4A7C15ULL;
        const uint64_t j = (uint64_t)(((unsigned __int128)mix64(state) * (uint64_t)(i + 1)) >> 64);
        const int64_t t = out[i];
        out[i] = out[j];
        out[j] = t;
    }
}
