/* A forest's churn probabilities, from the arrays TreeSHAP walks (server/forest_runtime.py).
 *
 * A C library called through ctypes (which releases the GIL for the call); its Python module is empty, as
 * the TreeSHAP kernel's is. The nodes are the 24-byte nodes of `_treeshap.c`, in preorder: an internal node
 * goes left (the next node) when the float32 input is <= its threshold, else to `right`; a leaf's `frac` is
 * its class-1 probability over the number of trees, so a row's probability is the sum of its leaves.
 *
 * Each row sums its trees in the forest's order, whatever the blocking or the threads, so a row scores the
 * same alone or in any batch. Trees go outermost, so a tree stays in cache across a batch. (Walking 8 rows
 * in lockstep, as the TreeSHAP kernel does, was faster at 16 rows but slower at 1 and 1,000 on the demo
 * model, so each row walks alone.)
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

/* out[r] = the forest's class-1 probability of row r of x (rows x cols float32, row-major). */
void streamflow_forest_proba(int trees, const int32_t *roots, const node_t *nodes, int rows, int cols,
                             const float *x, double *out) {
    for (int r = 0; r < rows; r++) out[r] = 0.0;
    for (int t = 0; t < trees; t++) {
        const node_t *root = nodes + roots[t];
        for (int r = 0; r < rows; r++) {
            const float *row = x + (int64_t)r * cols;
            const node_t *n = root;
            while (n->right >= 0) n = row[n->col] <= n->thr ? n + 1 : nodes + n->right;
            out[r] += n->frac;
        }
    }
}

static struct PyModuleDef forest_module = {
    PyModuleDef_HEAD_INIT, "_forest", "The forest kernel, called through ctypes (server/forest_runtime.py).", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__forest(void) { return PyModule_Create(&forest_module); }
