/* Exact path-dependent TreeSHAP of a forest, over the model's raw features (server/explanations.py).
 *
 * A plain C library, called through ctypes (which releases the GIL for the call): it links against nothing
 * but libm and holds no Python object. The forest comes as flat node arrays (children as global indices,
 * -1 for a leaf), each internal node testing one transformed column (`col`, a one-hot column or a number) and
 * belonging to one raw feature (`raw`): a raw feature is one player of the Shapley game, however many of its
 * columns its path tests.
 *
 * For a leaf, the value of a coalition S is v * prod over its path's raw features j of (j in S ? s_j : r_j),
 * where s_j is 1 when the input follows every node of the path that tests j and r_j the product of the path's
 * cover fractions at those nodes. With A the satisfied features (s_j = 1), U the others, m = |A| + |U| and
 * R_U the product of r over U, its Shapley values are (the Shapley weights written as a Beta integral):
 *   i in U:  -v R_U  integral_0^1 prod_{j in A} (t + r_j (1 - t)) (1 - t)^(|U| - 1) dt
 *   i in A:   v R_U (1 - r_i) integral_0^1 prod_{j in A \ i} (t + r_j (1 - t)) (1 - t)^|U| dt
 * The integrands are polynomials of degree m - 1, so Gauss-Legendre with ceil(m / 2) points is exact. A
 * depth-first walk keeps s and r of each raw feature for the current path, so a leaf costs O(m^2 / 2).
 */
#include <stdint.h>
#include <string.h>

#define MAX_RAW 16
#define NQ 8 /* quadrature points: exact for paths of up to 16 raw features */

typedef struct {
    const int32_t *left, *right, *col, *raw;
    const double *thr, *frac_left, *frac_right, *value;
    double t[NQ], rest[NQ]; /* the points t_q, and 1 - t_q */
    double w[NQ], neg[NQ];  /* the weights, and -w_q / (1 - t_q) */
    double inv_rest[NQ];            /* 1 / (1 - t_q) */
    const double *x;
    double *phi;
    double r[MAX_RAW];                      /* per raw feature: product of its path's cover fractions */
    int bad[MAX_RAW];                       /* per raw feature: nodes of the path the input does not follow */
    int used[MAX_RAW];                      /* per raw feature: nodes of the path that test it */
    double z[MAX_RAW][NQ];          /* per raw feature: its factor z_j(t_q) on the path (1 if absent) */
    double claimed[MAX_RAW][NQ];    /* per raw feature: leaf sums already credited to a deeper node */
} walk_t;

/* Walks the subtree of `node` with `p` the path's product of factors; writes to `s` the sum over its leaves
 * of value * product of factors. Each leaf's share of feature i is credited at the deepest node of its path
 * testing i, where the leaf's factor of i is known: the leaf sums of a child not credited deeper down. */
static void walk(walk_t *c, int node, const double *p, double *s) {
        if (c->left[node] < 0) {
        double v = c->value[node];
        for (int q = 0; q < NQ; q++) s[q] = v * p[q];
        return;
    }
    int i = c->raw[node];
    int goes_left = c->x[c->col[node]] <= c->thr[node];
    double r0 = c->r[i];
    int bad0 = c->bad[i];
    double z0[NQ], without[NQ], z[NQ], pc[NQ], sc[NQ];
    double before[NQ];
    /* The path's product without feature i's factor. Divisions are the walk's cost: only a satisfied
     * factor t + r (1 - t) needs them; an absent one is 1, an unsatisfied one r (1 - t). */
    for (int q = 0; q < NQ; q++) {
        z0[q] = c->z[i][q];
        s[q] = 0.0;
    }
    if (!c->used[i]) {
        for (int q = 0; q < NQ; q++) without[q] = p[q];
    } else if (bad0) {
        double inverse = 1.0 / r0;
        for (int q = 0; q < NQ; q++) without[q] = p[q] * inverse * c->inv_rest[q];
    } else {
        for (int q = 0; q < NQ; q++) without[q] = p[q] / z0[q];
    }
    c->used[i]++;
    for (int side = 0; side < 2; side++) {
        int child = side ? c->right[node] : c->left[node];
        double r = r0 * (side ? c->frac_right[node] : c->frac_left[node]);
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
        walk(c, child, pc, sc);
        double credit = 0.0;
        if (bad) {
            for (int q = 0; q < NQ; q++) credit += c->neg[q] * (sc[q] - (c->claimed[i][q] - before[q]));
        } else {
            for (int q = 0; q < NQ; q++)
                credit += (1.0 - r) * c->w[q] * (sc[q] - (c->claimed[i][q] - before[q])) / z[q];
        }
        c->phi[i] += credit;
        for (int q = 0; q < NQ; q++) {
            c->claimed[i][q] = before[q] + sc[q];
            s[q] += sc[q];
        }
    }
    c->r[i] = r0;
    c->bad[i] = bad0;
    c->used[i]--;
    for (int q = 0; q < NQ; q++) c->z[i][q] = z0[q];
}

/* Contributions of `n_rows` inputs (`x`: n_rows x n_cols transformed columns, as float64 of the float32 the
 * trees compare) to `phi` (n_rows x n_raw, added to). Returns 0, or -1 when the sizes exceed the tables. */
int streamflow_treeshap(int n_trees, const int32_t *roots, const int32_t *left, const int32_t *right,
                        const int32_t *col, const int32_t *raw, const double *thr, const double *frac_left,
                        const double *frac_right, const double *value, const double *gauss_t,
                        const double *gauss_w, int n_raw, int n_rows, int n_cols, const double *x,
                        double *phi) {
    if (n_raw > MAX_RAW) return -1;
    static walk_t zero;
    walk_t c = zero;
    c.left = left;
    c.right = right;
    c.col = col;
    c.raw = raw;
    c.thr = thr;
    c.frac_left = frac_left;
    c.frac_right = frac_right;
    c.value = value;
    for (int q = 0; q < NQ; q++) {
        c.t[q] = gauss_t[q];
        c.w[q] = gauss_w[q];
        c.rest[q] = 1.0 - c.t[q];
        c.neg[q] = -c.w[q] / c.rest[q];
        c.inv_rest[q] = 1.0 / c.rest[q];
    }
    double ones[NQ], s[NQ];
    for (int q = 0; q < NQ; q++) ones[q] = 1.0;
    /* Tree after tree, each for every row: a tree's nodes stay in cache across the rows. */
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
