/* Exact path-dependent TreeSHAP of a forest, over the model's raw features (server/explanations.py).
 *
 * A C library called through ctypes (which releases the GIL for the call); its Python module is empty and
 * exists so that importing every module of the package (as tests do) finds a module. The forest comes as one array of 24-byte nodes in preorder (a node's left child is the
 * next node), each internal node testing one transformed column (`col`: a one-hot column or a number) that
 * belongs to one raw feature (`raw`): a raw feature is one player of the Shapley game, however many of its
 * columns its path tests.
 *
 * For a leaf with value v, TreeSHAP values a coalition S as v * prod over its path's raw features j of
 * (j in S ? s_j : r_j), where s_j is 1 when the input follows every node of the path that tests j (else 0)
 * and r_j is the product of the path's cover fractions at those nodes. Writing the Shapley weights as a Beta
 * integral, the share of feature i is
 *     v (s_i - r_i) integral_0^1 prod_{j != i} z_j(t) dt,   z_j(t) = s_j t + r_j (1 - t),
 * a polynomial of degree m - 1 for m raw features on the path: 8 Gauss-Legendre points integrate it exactly
 * for up to 16 raw features. The walk carries the path's product of factors at the 8 points and credits
 * each leaf's share of feature i at the deepest node of its path testing i (where the leaf's z_i is known):
 * O(8) per node, one pass per tree and row. Trees go outermost, so a tree stays in cache across a batch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define MAX_RAW 16
#define NQ 8

typedef struct {
    double frac;    /* internal: the left child's cover over this node's; leaf: value / trees */
    int32_t right;  /* internal: the right child; leaf: -1 */
    float thr;      /* go left when the float32 input is <= thr (exact: the float32 below sklearn's) */
    uint16_t col;   /* the transformed column tested */
    uint16_t raw;   /* the raw feature it belongs to */
    uint32_t unused;
} node_t;

typedef struct {
    const node_t *nodes;
    double t[NQ], rest[NQ], w[NQ]; /* the points t_q, 1 - t_q and the weights */
    double neg[NQ];                /* -w_q / (1 - t_q): the weighted (s - r) / z of an unsatisfied factor */
    double inv_rest[NQ];           /* 1 / (1 - t_q) */
    const float *x;
    double *phi;
    double r[MAX_RAW];          /* per raw feature: the product of its path nodes' cover fractions */
    int bad[MAX_RAW];           /* per raw feature: nodes of the path the input does not follow */
    int used[MAX_RAW];          /* per raw feature: nodes of the path that test it */
    double z[MAX_RAW][NQ];      /* per raw feature: its factor on the path (1 when absent) */
    double claimed[MAX_RAW][NQ]; /* per raw feature: leaf sums already credited deeper down */
} walk_t;

/* Walks the subtree of `node`, `p` the path's product of factors; writes to `s` the sum over its leaves of
 * value * product of factors, and returns the node after the subtree (preorder). */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
static int32_t walk(walk_t *c, int32_t node, const double *p, double *s) {
    const node_t *n = c->nodes + node;
    if (n->right < 0) {
        for (int q = 0; q < NQ; q++) s[q] = n->frac * p[q];
        return node + 1;
    }
    int i = n->raw;
    int goes_left = c->x[n->col] <= n->thr;
    double r0 = c->r[i];
    int bad0 = c->bad[i];
    double z0[NQ], without[NQ], z[NQ], pc[NQ], sc[NQ], before[NQ];
    for (int q = 0; q < NQ; q++) {
        z0[q] = c->z[i][q];
        s[q] = 0.0;
    }
    /* The path's product without feature i's factor: 1 when absent, r (1 - t) when unsatisfied (no
     * division per point), t + r (1 - t) when satisfied. */
    if (!c->used[i]) {
        for (int q = 0; q < NQ; q++) without[q] = p[q];
    } else if (bad0) {
        double inverse = 1.0 / r0;
        for (int q = 0; q < NQ; q++) without[q] = p[q] * inverse * c->inv_rest[q];
    } else {
        for (int q = 0; q < NQ; q++) without[q] = p[q] / z0[q];
    }
    c->used[i]++;
    int32_t child = node + 1, after = node + 1;
    for (int side = 0; side < 2; side++) {
        double r = r0 * (side ? 1.0 - n->frac : n->frac);
        int bad = bad0 + (side ? goes_left : !goes_left);
        c->r[i] = r;
        c->bad[i] = bad;
        if (bad) {
            for (int q = 0; q < NQ; q++) z[q] = r * c->rest[q];
        } else {
            for (int q = 0; q < NQ; q++) z[q] = c->t[q] + r * c->rest[q];
        }
        for (int q = 0; q < NQ; q++) {
            c->z[i][q] = z[q];
            pc[q] = without[q] * z[q];
            before[q] = c->claimed[i][q];
        }
        after = walk(c, child, pc, sc);
        /* The leaves of this child not credited at a deeper node testing i have this node's z_i. */
        double credit = 0.0;
        if (bad) {
            for (int q = 0; q < NQ; q++) credit += c->neg[q] * (sc[q] - (c->claimed[i][q] - before[q]));
        } else {
            for (int q = 0; q < NQ; q++)
                credit += c->w[q] * (sc[q] - (c->claimed[i][q] - before[q])) / z[q];
            credit *= 1.0 - r;
        }
        c->phi[i] += credit;
        for (int q = 0; q < NQ; q++) {
            c->claimed[i][q] = before[q] + sc[q];
            s[q] += sc[q];
        }
        child = n->right;
    }
    c->r[i] = r0;
    c->bad[i] = bad0;
    c->used[i]--;
    for (int q = 0; q < NQ; q++) c->z[i][q] = z0[q];
    return after;
}

/* Adds the contributions of `n_rows` inputs (`x`: n_rows x n_cols float32 transformed columns) to `phi`
 * (n_rows x n_raw). `gauss_t`, `gauss_w`: the 8 Gauss-Legendre points and weights on [0, 1]. Returns 0, or
 * -1 when there are more raw features than the quadrature is exact for. */
int streamflow_treeshap(int n_trees, const int32_t *roots, const node_t *nodes, const double *gauss_t,
                        const double *gauss_w, int n_raw, int n_rows, int n_cols, const float *x,
                        double *phi) {
    if (n_raw > MAX_RAW) return -1;
    static const walk_t zero;
    walk_t c = zero;
    c.nodes = nodes;
    for (int q = 0; q < NQ; q++) {
        c.t[q] = gauss_t[q];
        c.w[q] = gauss_w[q];
        c.rest[q] = 1.0 - c.t[q];
        c.neg[q] = -c.w[q] / c.rest[q];
        c.inv_rest[q] = 1.0 / c.rest[q];
    }
    double ones[NQ], s[NQ];
    for (int q = 0; q < NQ; q++) ones[q] = 1.0;
    for (int k = 0; k < n_trees; k++) {
        for (int row = 0; row < n_rows; row++) {
            c.x = x + (int64_t)row * n_cols;
            c.phi = phi + (int64_t)row * n_raw;
            for (int j = 0; j < n_raw; j++) {
                c.r[j] = 1.0;
                c.bad[j] = 0;
                c.used[j] = 0;
                for (int q = 0; q < NQ; q++) {
                    c.z[j][q] = 1.0;
                    c.claimed[j][q] = 0.0;
                }
            }
            walk(&c, roots[k], ones, s);
        }
    }
    return 0;
}

static struct PyModuleDef treeshap_module = {
    PyModuleDef_HEAD_INIT, "_treeshap", "The TreeSHAP kernel, called through ctypes (server/explanations.py).", -1,
    NULL,
};

PyMODINIT_FUNC PyInit__treeshap(void) { return PyModule_Create(&treeshap_module); }
