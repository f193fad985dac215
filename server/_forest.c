/* A forest's churn probabilities, from the arrays TreeSHAP walks (server/forest_runtime.py).
 *
 * A C library called through ctypes (which releases the GIL for the call); its Python module is empty, as
 * the TreeSHAP kernel's is. The nodes are the 24-byte nodes of `_treeshap.c`, in preorder: an internal node
 * goes left (the next node) when the float32 input is <= its threshold, else to `right`; a leaf's `frac` is
 * its class-1 probability over the number of trees, so a row's probability is the sum of its leaves.
 *
 * Each row sums its trees in the forest's order, whatever the blocking or the threads, so a row scores the
 * same alone or in any batch. A row walks 8 trees in lockstep: a lone Predict's walk is a chain of dependent
 * loads, mostly cache misses in a server whose call layer has cooled the caches since the last call, and 8
 * independent chains keep 8 misses in flight (one row after a 64 MB sweep: 0.26 ms instead of 0.35; hot:
 * 0.05 instead of 0.07; 1,000 rows hot: 16 ms instead of 14, on the demo model). Blocks of trees go
 * outermost, so they stay in cache across a batch's rows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    double frac;
    int32_t right;
    float thr;
    uint16_t col;
    uint16_t raw;
    uint32_t unused;
} node_t;

_Static_assert(sizeof(node_t) == 24, "node_t is the 24-byte node of server/explanations.py's NODE");

#define LANES 8 /* trees walked together for one row */

/* out[r] = the forest's class-1 probability of row r of x (rows x cols float32, row-major). */
void streamflow_forest_proba(int trees, const int32_t *roots, const node_t *nodes, int rows, int cols,
                             const float *x, double *out) {
    for (int r = 0; r < rows; r++) out[r] = 0.0;
    for (int t0 = 0; t0 < trees; t0 += LANES) {
        int lanes = trees - t0 < LANES ? trees - t0 : LANES;
        for (int r = 0; r < rows; r++) {
            const float *row = x + (int64_t)r * cols;
            const node_t *at[LANES];
            for (int k = 0; k < lanes; k++) at[k] = nodes + roots[t0 + k];
            /* One step of every unfinished walk per round: their loads are in flight together. */
            for (int walking = 1; walking;) {
                walking = 0;
                for (int k = 0; k < lanes; k++) {
                    const node_t *n = at[k];
                    if (n->right >= 0) {
                        at[k] = row[n->col] <= n->thr ? n + 1 : nodes + n->right;
                        walking = 1;
                    }
                }
            }
            double sum = out[r];
            for (int k = 0; k < lanes; k++) sum += at[k]->frac; /* in tree order */
            out[r] = sum;
        }
    }
}

static struct PyModuleDef forest_module = {
    PyModuleDef_HEAD_INIT, "_forest", "The forest kernel, called through ctypes (server/forest_runtime.py).", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__forest(void) { return PyModule_Create(&forest_module); }
