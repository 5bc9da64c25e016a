// Routed SwiGLU experts of one MoE layer on a CPU, forward and backward, as XLA FFI handlers.
//
//   y[n] = sum_j w[n, j] * down_e(silu(x[n] gate_e) * (x[n] up_e)),   e = ids[n, j]
//
// The N*k assignments are grouped by expert with a counting sort (stable: ascending assignment index
// within an expert); each expert's rows are gathered into a contiguous buffer and multiplied by its
// weights in place with OpenBLAS sgemm (scipy-openblas32), so there is no padding, no weight copy and
// no per-block loop overhead. Ids outside [0, E) are "no assignment": they contribute nothing and get a
// zero routing-weight gradient (expert parallelism relies on this).
//
// The forward also returns the pre-activations [g | u] of every assignment in expert-sorted order
// ([M, 2F]); the backward re-derives the same order and reads them instead of recomputing the gate
// and up matmuls. Everything is float32. The reference is the "dense" dispatch in
// ling_jax/layers/dispatch.py (tests/test_cpu_kernels.py compares values and gradients).

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shapes {
  int64_t N, k, D, E, F;
};

// Assignments grouped by expert: order[start[e] .. start[e + 1]) are expert e's assignment indices.
struct Groups {
  std::vector<int64_t> start;
  std::vector<int64_t> order;
};

Groups GroupByExpert(const int32_t* ids, int64_t M, int64_t E) {
  Groups g;
  g.start.assign(E + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    const int32_t e = ids[m];
    if (e >= 0 && e < E) ++g.start[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) g.start[e + 1] += g.start[e];
  g.order.resize(g.start[E]);
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t m = 0; m < M; ++m) {
    const int32_t e = ids[m];
    if (e >= 0 && e < E) g.order[fill[e]++] = m;
  }
  return g;
}

inline float Sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// C[m, n] = alpha * op(A) op(B) + beta * C, row-major.
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t kk, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    m, n, kk, 1.0f, a, lda, b, ldb, beta, c, ldc);
}

void GatherRows(const float* src, const int64_t* assignments, int64_t rows, int64_t k, int64_t D, float* dst) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * D, src + (assignments[r] / k) * D, D * sizeof(float));
}

template <typename B>
std::vector<int64_t> Dims(const B& b) {
  return std::vector<int64_t>(b.dimensions().begin(), b.dimensions().end());
}

// The Python wrapper checks shapes with named errors first; this guards the raw FFI targets.
ffi::Error CheckShapes(const Shapes& s, const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::S32>& ids,
                       const ffi::Buffer<ffi::F32>& weights, const ffi::Buffer<ffi::F32>& gate,
                       const ffi::Buffer<ffi::F32>& up, const ffi::Buffer<ffi::F32>& down) {
  using V = std::vector<int64_t>;
  const bool ok = Dims(x) == V{s.N, s.D} && Dims(ids) == V{s.N, s.k} && Dims(weights) == V{s.N, s.k} &&
                  Dims(gate) == V{s.E, s.D, s.F} && Dims(up) == V{s.E, s.D, s.F} && Dims(down) == V{s.E, s.F, s.D};
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "moe_experts: shapes disagree (want x [N, D], ids and weights [N, k], gate and up [E, D, F], down [E, F, D])");
  }
  return ffi::Error::Success();
}

Shapes ShapesOf(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S32>& ids, ffi::Buffer<ffi::F32>& gate) {
  const auto xd = x.dimensions();
  const auto id = ids.dimensions();
  const auto gd = gate.dimensions();
  return Shapes{xd[0], id.size() == 2 ? id[1] : 0, xd[1], gd[0], gd.size() == 3 ? gd[2] : 0};
}

// Experts dealt to `lanes` work lists, largest first to the least-loaded list (ties: lowest expert, then
// lowest list), each list in ascending expert order. The plan depends only on the group sizes, so
// which experts share an accumulator, and the order of every floating-point sum, is the same on every
// run with the same number of lanes (OpenMP threads): results are reproducible bit for bit.
std::vector<std::vector<int64_t>> PlanLanes(const Groups& g, int lanes) {
  const int64_t E = static_cast<int64_t>(g.start.size()) - 1;
  std::vector<int64_t> experts(E);
  for (int64_t e = 0; e < E; ++e) experts[e] = e;
  auto rows = [&](int64_t e) { return g.start[e + 1] - g.start[e]; };
  std::stable_sort(experts.begin(), experts.end(), [&](int64_t a, int64_t b) { return rows(a) > rows(b); });
  std::vector<std::vector<int64_t>> plan(lanes);
  std::vector<int64_t> load(lanes, 0);
  for (int64_t e : experts) {
    if (rows(e) == 0) continue;
    const int lane = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    plan[lane].push_back(e);
    load[lane] += rows(e);
  }
  for (auto& list : plan) std::sort(list.begin(), list.end());
  return plan;
}

// Per-lane scratch for one expert's rows, grown on demand.
struct Scratch {
  std::vector<float> a, b, c, d;
  void Fit(int64_t rows, int64_t D, int64_t F) {
    const size_t wide = static_cast<size_t>(rows * std::max(D, 2 * F));
    for (auto* v : {&a, &b, &c, &d}) {
      if (v->size() < wide) v->resize(wide);
    }
  }
};

// out = the sum of the per-lane accumulators, in lane order (elements split over the threads).
void ReduceAccumulators(const std::vector<std::vector<float>>& acc, float* out, int64_t size) {
  const int lanes = static_cast<int>(acc.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < size; ++i) {
    float total = acc[0][i];
    for (int t = 1; t < lanes; ++t) total += acc[t][i];
    out[i] = total;
  }
}

// Runs per_expert(e, rows of e, scratch, accumulator) for every expert with rows, the experts dealt
// to lanes (PlanLanes), one lane per OpenMP thread, OpenBLAS single-threaded per call: small
// per-expert GEMMs scale better this way than split over the threads one at a time. Each lane
// scatter-adds token rows into its own [N, D] accumulator (two experts of one token may run at once);
// out = their sum in lane order.
template <typename PerExpert>
void ForExpertsInLanes(const Groups& g, int64_t acc_size, float* out, const PerExpert& per_expert) {
  const int lanes = omp_get_max_threads();
  const auto plan = PlanLanes(g, lanes);
  std::vector<std::vector<float>> acc(lanes);
  scipy_openblas_set_num_threads(1);
#pragma omp parallel for schedule(static, 1)
  for (int t = 0; t < lanes; ++t) {
    acc[t].assign(acc_size, 0.0f);
    Scratch scratch;
    for (const int64_t e : plan[t]) per_expert(e, g.start[e + 1] - g.start[e], scratch, acc[t].data());
  }
  ReduceAccumulators(acc, out, acc_size);
}

// acc[token of row r] += scale_r * rows[r] (scale_r = weights[assignment r], or 1 without weights).
void ScatterAddRows(const float* rows_RD, const int64_t* assignments, int64_t rows, int64_t k, int64_t D,
                    const float* weights_M, float* acc_ND) {
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = weights_M != nullptr ? weights_M[assignments[r]] : 1.0f;
    float* dst = acc_ND + (assignments[r] / k) * D;
    const float* src = rows_RD + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] += scale * src[d];
  }
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> weights,
                   ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> down,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> gu) {
  const Shapes s = ShapesOf(x, ids, gate);
  if (ffi::Error err = CheckShapes(s, x, ids, weights, gate, up, down); err.failure()) return err;
  const int64_t M = s.N * s.k, D = s.D, F = s.F;
  const Groups g = GroupByExpert(ids.typed_data(), M, s.E);
  float* gu_M2F = gu->typed_data();
  ForExpertsInLanes(g, s.N * D, y->typed_data(), [&](int64_t e, int64_t rows, Scratch& sc, float* y_acc) {
    sc.Fit(rows, D, F);
    const int64_t* assignments = g.order.data() + g.start[e];
    float *x_rows = sc.a.data(), *h = sc.b.data(), *out = sc.c.data();
    GatherRows(x.typed_data(), assignments, rows, s.k, D, x_rows);
    float* gu_rows = gu_M2F + g.start[e] * 2 * F;
    Gemm(false, false, rows, F, D, x_rows, D, gate.typed_data() + e * D * F, F, 0.0f, gu_rows, 2 * F);
    Gemm(false, false, rows, F, D, x_rows, D, up.typed_data() + e * D * F, F, 0.0f, gu_rows + F, 2 * F);
    for (int64_t r = 0; r < rows; ++r) {
      const float* gr = gu_rows + r * 2 * F;
      float* hr = h + r * F;
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) hr[f] = gr[f] * Sigmoid(gr[f]) * gr[F + f];
    }
    Gemm(false, false, rows, D, F, h, F, down.typed_data() + e * F * D, D, 0.0f, out, D);
    ScatterAddRows(out, assignments, rows, s.k, D, weights.typed_data(), y_acc);
  });
  // Rows past the assigned ones (invalid ids) are never read; keep them defined.
  std::memset(gu_M2F + g.start[s.E] * 2 * F, 0, sizeof(float) * (M - g.start[s.E]) * 2 * F);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> weights,
                    ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> down,
                    ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> gu, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dweights, ffi::ResultBuffer<ffi::F32> dgate,
                    ffi::ResultBuffer<ffi::F32> dup, ffi::ResultBuffer<ffi::F32> ddown) {
  const Shapes s = ShapesOf(x, ids, gate);
  if (ffi::Error err = CheckShapes(s, x, ids, weights, gate, up, down); err.failure()) return err;
  const int64_t M = s.N * s.k, D = s.D, F = s.F;
  const Groups g = GroupByExpert(ids.typed_data(), M, s.E);
  const float* w_M = weights.typed_data();
  float* dw_M = dweights->typed_data();
  std::memset(dw_M, 0, sizeof(float) * M);  // invalid ids keep a zero routing-weight gradient
  for (int64_t e = 0; e < s.E; ++e) {         // experts without rows: zero weight gradients
    if (g.start[e + 1] > g.start[e]) continue;
    std::memset(dgate->typed_data() + e * D * F, 0, sizeof(float) * D * F);
    std::memset(dup->typed_data() + e * D * F, 0, sizeof(float) * D * F);
    std::memset(ddown->typed_data() + e * F * D, 0, sizeof(float) * F * D);
  }
  ForExpertsInLanes(g, s.N * D, dx->typed_data(), [&](int64_t e, int64_t rows, Scratch& sc, float* dx_acc) {
    sc.Fit(rows, D, F);
    const int64_t* assignments = g.order.data() + g.start[e];
    float *x_rows = sc.a.data(), *dy_rows = sc.b.data(), *dgu = sc.c.data(), *dyw = sc.d.data();
    GatherRows(x.typed_data(), assignments, rows, s.k, D, x_rows);
    GatherRows(dy.typed_data(), assignments, rows, s.k, D, dy_rows);
    // dyW = dy down_e^T: serves <out, dy> = <h, dyW> (routing weight) and dh = w * dyW.
    Gemm(false, true, rows, F, D, dy_rows, D, down.typed_data() + e * F * D, D, 0.0f, dyw, F);
    const float* gu_rows = gu.typed_data() + g.start[e] * 2 * F;
    for (int64_t r = 0; r < rows; ++r) {
      const float wr = w_M[assignments[r]];
      const float* gr = gu_rows + r * 2 * F;
      float* dyw_r = dyw + r * F;
      float* dgu_r = dgu + r * 2 * F;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t f = 0; f < F; ++f) {
        const float gv = gr[f], uv = gr[F + f], sg = Sigmoid(gv);
        const float a = gv * sg, h = a * uv, dh = wr * dyw_r[f];
        dot += h * dyw_r[f];
        dgu_r[f] = dh * uv * sg * (1.0f + gv * (1.0f - sg));
        dgu_r[F + f] = dh * a;
        dyw_r[f] = wr * h;  // dyW is used up: keep w * h, the down projection's input gradient factor
      }
      dw_M[assignments[r]] = dot;
    }
    Gemm(true, false, F, D, rows, dyw, F, dy_rows, D, 0.0f, ddown->typed_data() + e * F * D, D);
    Gemm(true, false, D, F, rows, x_rows, D, dgu, 2 * F, 0.0f, dgate->typed_data() + e * D * F, F);
    Gemm(true, false, D, F, rows, x_rows, D, dgu + F, 2 * F, 0.0f, dup->typed_data() + e * D * F, F);
    float* dx_rows = x_rows;  // x rows are used up
    Gemm(false, true, rows, D, F, dgu, 2 * F, gate.typed_data() + e * D * F, F, 0.0f, dx_rows, D);
    Gemm(false, true, rows, D, F, dgu + F, 2 * F, up.typed_data() + e * D * F, F, 1.0f, dx_rows, D);
    ScatterAddRows(dx_rows, assignments, rows, s.k, D, nullptr, dx_acc);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LingMoeExpertsForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [N, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ids [N, k]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights [N, k]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gate [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // up [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // down [E, F, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [N, D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [g | u] [N * k, 2F], expert-sorted

XLA_FFI_DEFINE_HANDLER_SYMBOL(LingMoeExpertsBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ids
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gate
                                  .Arg<ffi::Buffer<ffi::F32>>()   // up
                                  .Arg<ffi::Buffer<ffi::F32>>()   // down
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy [N, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // [g | u] from the forward
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx [N, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dweights [N, k]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dgate [E, D, F]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dup [E, D, F]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // ddown [E, F, D]
