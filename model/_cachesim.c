/* The hot loops of model/cache_sim.py, compiled: per-access work over row-id streams of hundreds of
 * millions of accesses. Every function processes one chunk of a stream and carries its state in
 * numpy arrays the caller owns, so the stream never has to be in memory at once. Same semantics as
 * the pure-Python fallbacks in cache_sim.py (tests check they agree). The GIL is released while
 * a chunk runs. Rows and access times are uint32: the caller checks a layer has fewer than 2**32
 * rows and a stream fewer than 2**32 - 1 accesses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NONE 0xFFFFFFFFu

static int get(PyObject *obj, Py_buffer *view, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous%s buffer", name, writable ? " writable" : "");
        return -1;
    }
    return 0;
}

/* ---- LRU stack distances: a Fenwick tree over "slots" (last-use times, renumbered on compaction) ---- */

static inline void fen_add(uint32_t *tree, uint64_t cap, uint64_t i, int32_t delta) {
    for (i += 1; i <= cap; i += i & (~i + 1)) tree[i - 1] += (uint32_t)delta;
}

static inline uint64_t fen_prefix(const uint32_t *tree, uint64_t i) { /* live markers in slots [0, i] */
    uint64_t s = 0;
    for (i += 1; i > 0; i -= i & (~i + 1)) s += tree[i - 1];
    return s;
}

/* Keep the `keep` most recent live markers, renumbered 0..keep-1; forget deeper ones (their stack depth
 * already exceeds the largest cache simulated, and a depth only grows until the row is used again). */
static uint64_t compact(uint32_t *tree, uint32_t *slot_row, uint32_t *last_slot, uint64_t used, uint64_t cap,
                        uint64_t live, uint64_t keep) {
    uint64_t skip = live > keep ? live - keep : 0, j = 0;
    for (uint64_t s = 0; s < used; s++) {
        uint32_t row = slot_row[s];
        if (last_slot[row] != (uint32_t)s) continue;
        if (skip) {
            skip--;
            last_slot[row] = NONE;
            continue;
        }
        slot_row[j] = row;
        last_slot[row] = (uint32_t)j;
        j++;
    }
    memset(tree, 0, cap * sizeof(uint32_t));
    for (uint64_t i = 1; i <= cap; i++) { /* a Fenwick tree of j ones then zeros, built in O(cap) */
        if (i <= j) tree[i - 1] += 1;
        uint64_t parent = i + (i & (~i + 1));
        if (parent <= cap) tree[parent - 1] += tree[i - 1];
    }
    return j;
}

/* lru(rows, t0, heads, per_order, counts, last_slot, tree, slot_row, state, sizes, hits, log2hist)
 * rows: uint32[m], accesses t0..t0+m-1 (order = ((t % heads) / per_order)).
 * counts: uint32[R] accesses per row so far (0: the next access is compulsory).
 * last_slot: uint32[R]; tree, slot_row: uint32[cap]; state: uint64[2] = {slots used, live markers}.
 * sizes: uint64[k] ascending cache sizes; hits: uint64[orders, k+2]: column i < k counts accesses whose
 * distance d satisfies sizes[i-1] < d <= sizes[i], column k those deeper than sizes[k-1], column k+1 the
 * compulsory misses. log2hist: uint64[orders, 66]: bin b counts 2**(b-1) < d <= 2**b (d = 1 in bin 0),
 * bin 64 distances deeper than sizes[k-1], bin 65 compulsory misses. */
static PyObject *lru(PyObject *self, PyObject *args) {
    PyObject *o_rows, *o_counts, *o_last, *o_tree, *o_slot, *o_state, *o_sizes, *o_hits, *o_log2;
    unsigned long long t0;
    Py_ssize_t heads, per_order;
    if (!PyArg_ParseTuple(args, "OKnnOOOOOOOO", &o_rows, &t0, &heads, &per_order, &o_counts, &o_last, &o_tree,
                          &o_slot, &o_state, &o_sizes, &o_hits, &o_log2))
        return NULL;
    Py_buffer b[9];
    PyObject *objs[9] = {o_rows, o_counts, o_last, o_tree, o_slot, o_state, o_sizes, o_hits, o_log2};
    const int writable[9] = {0, 1, 1, 1, 1, 1, 0, 1, 1};
    const char *names[9] = {"rows", "counts", "last_slot", "tree", "slot_row", "state", "sizes", "hits", "log2hist"};
    int got = 0;
    for (; got < 9; got++)
        if (get(objs[got], &b[got], writable[got], names[got]) < 0) goto fail;
    const uint32_t *rows = b[0].buf;
    uint32_t *counts = b[1].buf, *last_slot = b[2].buf, *tree = b[3].buf, *slot_row = b[4].buf;
    uint64_t *state = b[5].buf, *hits = b[7].buf, *log2hist = b[8].buf;
    const uint64_t *sizes = b[6].buf;
    uint64_t m = b[0].len / 4, cap = b[3].len / 4, k = b[6].len / 8;
    uint64_t max_size = sizes[k - 1];
    Py_BEGIN_ALLOW_THREADS;
    uint64_t used = state[0], live = state[1];
    for (uint64_t i = 0; i < m; i++) {
        uint32_t row = rows[i];
        uint64_t order = ((t0 + i) % (uint64_t)heads) / (uint64_t)per_order;
        uint64_t *h = hits + order * (k + 2), *l = log2hist + order * 66;
        if (counts[row] == 0) {
            h[k + 1]++;
            l[65]++;
        } else if (last_slot[row] == NONE) {
            h[k]++;
            l[64]++;
        } else {
            uint64_t s = last_slot[row];
            uint64_t d = live - fen_prefix(tree, s) + 1;
            fen_add(tree, cap, s, -1);
            live--;
            last_slot[row] = NONE; /* its old marker is gone: a compaction before its new one must not keep it */
            if (d > max_size) {
                h[k]++;
                l[64]++;
            } else {
                uint64_t lo = 0, hi = k - 1; /* first size >= d */
                while (lo < hi) {
                    uint64_t mid = (lo + hi) / 2;
                    if (sizes[mid] >= d) hi = mid; else lo = mid + 1;
                }
                h[lo]++;
                uint64_t bin = 0;
                while ((1ull << bin) < d) bin++;
                l[bin]++;
            }
        }
        counts[row]++;
        if (used == cap) used = compact(tree, slot_row, last_slot, used, cap, live, max_size), live = used;
        fen_add(tree, cap, used, 1);
        slot_row[used] = row;
        last_slot[row] = (uint32_t)used;
        used++;
        live++;
    }
    state[0] = used;
    state[1] = live;
    Py_END_ALLOW_THREADS;
    for (int j = 0; j < 9; j++) PyBuffer_Release(&b[j]);
    Py_RETURN_NONE;
fail:
    for (int j = 0; j < got; j++) PyBuffer_Release(&b[j]);
    return NULL;
}

/* next_use(rows, t0, last_seen, out): rows uint32[m] are accesses t0..t0+m-1, given in stream order but
 * processed backwards (the caller walks the chunks from the end). out[i] = the next access time of rows[i]
 * after t0+i, NONE if never. last_seen: uint32[R], NONE initially. */
static PyObject *next_use(PyObject *self, PyObject *args) {
    PyObject *o_rows, *o_last, *o_out;
    unsigned long long t0;
    if (!PyArg_ParseTuple(args, "OKOO", &o_rows, &t0, &o_last, &o_out)) return NULL;
    Py_buffer br, bl, bo;
    if (get(o_rows, &br, 0, "rows") < 0) return NULL;
    if (get(o_last, &bl, 1, "last_seen") < 0) { PyBuffer_Release(&br); return NULL; }
    if (get(o_out, &bo, 1, "out") < 0) { PyBuffer_Release(&br); PyBuffer_Release(&bl); return NULL; }
    const uint32_t *rows = br.buf;
    uint32_t *last = bl.buf, *out = bo.buf;
    uint64_t m = br.len / 4;
    Py_BEGIN_ALLOW_THREADS;
    for (uint64_t i = m; i-- > 0;) {
        uint32_t row = rows[i];
        out[i] = last[row];
        last[row] = (uint32_t)(t0 + i);
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&br);
    PyBuffer_Release(&bl);
    PyBuffer_Release(&bo);
    Py_RETURN_NONE;
}

/* ---- LFU and the offline optimum: one cache of a given size, a binary heap over its rows ---- */

typedef struct {
    uint64_t *key;
    uint32_t *row;
    uint32_t *pos; /* [R]: heap index of a resident row, NONE otherwise */
    uint64_t size;
    int max_heap;
} Heap;

static inline int above(const Heap *h, uint64_t a, uint64_t b) { /* a belongs nearer the root than b */
    return h->max_heap ? a > b : a < b;
}

static inline void place(Heap *h, uint64_t i, uint64_t key, uint32_t row) {
    h->key[i] = key;
    h->row[i] = row;
    h->pos[row] = (uint32_t)i;
}

static void sift_up(Heap *h, uint64_t i) {
    uint64_t key = h->key[i];
    uint32_t row = h->row[i];
    while (i > 0) {
        uint64_t parent = (i - 1) / 2;
        if (!above(h, key, h->key[parent])) break;
        place(h, i, h->key[parent], h->row[parent]);
        i = parent;
    }
    place(h, i, key, row);
}

static void sift_down(Heap *h, uint64_t i) {
    uint64_t key = h->key[i];
    uint32_t row = h->row[i];
    for (;;) {
        uint64_t child = 2 * i + 1;
        if (child >= h->size) break;
        if (child + 1 < h->size && above(h, h->key[child + 1], h->key[child])) child++;
        if (!above(h, h->key[child], key)) break;
        place(h, i, h->key[child], h->row[child]);
        i = child;
    }
    place(h, i, key, row);
}

/* simulate(policy, rows, nexts, t0, n, heads, per_order, capacity, key, row, pos, counts, state, hits)
 * policy 0 = LFU: every access counts (counts: uint32[R], all accesses so far, resident or not); on a miss
 *   the row is always admitted, evicting the resident row with the fewest accesses, the least recently
 *   used among equals (key = count << 32 | last access time).
 * policy 1 = OPT (Belady with bypass): key = next use (nexts[i], NONE = never, then n + t, unique); on a
 *   miss with a full cache the row whose next use is farthest among the residents and the new one is left
 *   out: the new row is not admitted when it is that row.
 * key: uint64[capacity], row: uint32[capacity], pos: uint32[R] (NONE initially), state: uint64[1] = {heap
 * size}, hits: uint64[orders]. */
static PyObject *simulate(PyObject *self, PyObject *args) {
    int policy;
    PyObject *o_rows, *o_nexts, *o_key, *o_row, *o_pos, *o_counts, *o_state, *o_hits;
    unsigned long long t0, n, capacity;
    Py_ssize_t heads, per_order;
    if (!PyArg_ParseTuple(args, "iOOKKnnKOOOOOO", &policy, &o_rows, &o_nexts, &t0, &n, &heads, &per_order,
                          &capacity, &o_key, &o_row, &o_pos, &o_counts, &o_state, &o_hits))
        return NULL;
    Py_buffer b[8];
    PyObject *objs[8] = {o_rows, o_nexts, o_key, o_row, o_pos, o_counts, o_state, o_hits};
    const int writable[8] = {0, 0, 1, 1, 1, 1, 1, 1};
    const char *names[8] = {"rows", "nexts", "key", "row", "pos", "counts", "state", "hits"};
    int got = 0;
    for (; got < 8; got++)
        if (get(objs[got], &b[got], writable[got], names[got]) < 0) goto fail;
    const uint32_t *rows = b[0].buf, *nexts = b[1].buf;
    uint32_t *counts = b[5].buf;
    uint64_t *state = b[6].buf, *hits = b[7].buf;
    uint64_t m = b[0].len / 4;
    if (policy == 1 && (uint64_t)b[1].len / 4 != m) {
        PyErr_SetString(PyExc_ValueError, "nexts must match rows");
        goto fail;
    }
    Heap h = {b[2].buf, b[3].buf, b[4].buf, state[0], policy == 1};
    Py_BEGIN_ALLOW_THREADS;
    for (uint64_t i = 0; i < m; i++) {
        uint64_t t = t0 + i;
        uint32_t r = rows[i];
        uint64_t key;
        if (policy == 0) {
            counts[r]++;
            key = ((uint64_t)counts[r] << 32) | (t & 0xFFFFFFFFull);
        } else {
            key = nexts[i] == NONE ? n + t : nexts[i];
        }
        uint32_t p = h.pos[r];
        if (p != NONE) {
            hits[((t % (uint64_t)heads) / (uint64_t)per_order)]++;
            h.key[p] = key; /* LFU: count up (min-heap, moves down); OPT: later next use (max-heap, moves up) */
            if (policy == 0) sift_down(&h, p); else sift_up(&h, p);
        } else if (capacity == 0) {
            continue;
        } else if (h.size < capacity) {
            place(&h, h.size, key, r);
            h.size++;
            sift_up(&h, h.size - 1);
        } else if (policy == 0 || key < h.key[0]) {
            h.pos[h.row[0]] = NONE;
            place(&h, 0, key, r);
            sift_down(&h, 0);
        }
    }
    state[0] = h.size;
    Py_END_ALLOW_THREADS;
    for (int j = 0; j < 8; j++) PyBuffer_Release(&b[j]);
    Py_RETURN_NONE;
fail:
    for (int j = 0; j < got; j++) PyBuffer_Release(&b[j]);
    return NULL;
}

/* remap(rows, idmap, state, out, fresh) -> number of fresh rows: dense ids in order of first touch.
 * idmap: uint32[R], NONE initially; state: uint64[1] = {ids given}; out: uint32[m] the dense ids;
 * fresh: uint32[m], its first k entries the rows first touched in this chunk, in order. */
static PyObject *remap(PyObject *self, PyObject *args) {
    PyObject *o_rows, *o_map, *o_state, *o_out, *o_fresh;
    if (!PyArg_ParseTuple(args, "OOOOO", &o_rows, &o_map, &o_state, &o_out, &o_fresh)) return NULL;
    Py_buffer b[5];
    PyObject *objs[5] = {o_rows, o_map, o_state, o_out, o_fresh};
    const int writable[5] = {0, 1, 1, 1, 1};
    const char *names[5] = {"rows", "idmap", "state", "out", "fresh"};
    int got = 0;
    for (; got < 5; got++)
        if (get(objs[got], &b[got], writable[got], names[got]) < 0) goto fail;
    const uint32_t *rows = b[0].buf;
    uint32_t *idmap = b[1].buf, *out = b[3].buf, *fresh = b[4].buf;
    uint64_t *state = b[2].buf;
    uint64_t m = b[0].len / 4, k = 0;
    Py_BEGIN_ALLOW_THREADS;
    uint64_t next = state[0];
    for (uint64_t i = 0; i < m; i++) {
        uint32_t r = rows[i], id = idmap[r];
        if (id == NONE) {
            id = idmap[r] = (uint32_t)next++;
            fresh[k++] = r;
        }
        out[i] = id;
    }
    state[0] = next;
    Py_END_ALLOW_THREADS;
    for (int j = 0; j < 5; j++) PyBuffer_Release(&b[j]);
    return PyLong_FromUnsignedLongLong(k);
fail:
    for (int j = 0; j < got; j++) PyBuffer_Release(&b[j]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"remap", remap, METH_VARARGS, "Dense row ids in order of first touch."},
    {"lru", lru, METH_VARARGS, "LRU stack distances of a chunk (Fenwick tree over last uses)."},
    {"next_use", next_use, METH_VARARGS, "Next-use times of a chunk, walking backwards."},
    {"simulate", simulate, METH_VARARGS, "LFU (0) or OPT (1) hits of one cache over a chunk."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cachesim", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cachesim(void) { return PyModule_Create(&module); }
