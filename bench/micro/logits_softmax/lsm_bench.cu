// The logits GEMM with the online softmax in its epilogue (csrc/cuda/logits_softmax_sm90.cuh), standalone: checks
// it against cuBLAS (z) and against a host recomputation from its own z (P, the partials, the label columns), then
// times it beside cuBLAS's GEMM of the same block. No torch.
//   [1] z (copy mode) vs cuBLAS, both cluster sizes, two block shapes (full block, ragged block past V's end)
//   [2] P / partials / labels (softmax mode) vs the host, rows with every kind of reference (−inf, far below, near,
//       above the tile maxima: flagged and unflagged tiles)
//   [3] timing, median of 20 after 3 warmups, a 256 MiB L2 flush before each rep
#include <cublas_v2.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "../cuda_check.cuh"
#define SWIFTLORA_LS_CLUSTER_KERNEL 1
#include "cuda/logits_softmax_sm90.cuh"

namespace ls = swiftlora::cuda::logits_sm90;

#define CB(call)                                                               \
  do {                                                                         \
    cublasStatus_t s_ = (call);                                                \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                         \
      fprintf(stderr, "cuBLAS error %d at %s:%d\n", (int)s_, __FILE__, __LINE__); \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

static int g_sms = 132;
static int g_sums = ls::kSumZ | ls::kSumEz;  // which optional row sums the kernel forms (checked: all)

__global__ void flush_kernel(uint4* p, size_t n16, uint32_t v) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16; i += stride) {
    p[i] = make_uint4(v, v, v, v);
  }
}

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;
static uint32_t rnd32() {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return static_cast<uint32_t>(g_rng >> 16);
}
static double rnd01() { return (rnd32() + 0.5) / 4294967296.0; }
static double rndn() { return std::sqrt(-2.0 * std::log(rnd01())) * std::cos(6.283185307179586 * rnd01()); }
static uint16_t f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
static float bf2f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (!fn) {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || !f) {
      fprintf(stderr, "no cuTensorMapEncodeTiled\n");
      exit(1);
    }
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }
  return fn;
}
static CUtensorMap tmap_bf16(const void* ptr, uint64_t inner, uint64_t rows, uint32_t box_rows) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {inner, rows};
  const cuuint64_t strides[1] = {inner * 2};
  const cuuint32_t box[2] = {64, box_rows};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r = encoder()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(ptr), dims, strides, box,
                               unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    fprintf(stderr, "cuTensorMapEncodeTiled failed (%d)\n", (int)r);
    exit(1);
  }
  return m;
}

struct Problem {
  int m, k, vtot;      // hidden [m, k], W [vtot, k]
  uint16_t *h, *w;     // device
  std::vector<uint16_t> hh, hw;
};

struct Block {
  int v0, width;
  uint16_t* out;   // [m, width]
  float* stats;    // [m, 6]
  float4* part;    // [m, tiles_n]
  int64_t* labels;
  int tiles_m, tiles_n;
};

// hidden [m, k] ~ N(0, 1) and W [vtot, k] ~ N(0, 0.06²) in bf16 (logits ~ N(0, 2.7) at k = 2048), on host and device
static Problem make_problem(int m, int k, int vtot) {
  Problem pr{};
  pr.m = m, pr.k = k, pr.vtot = vtot;
  pr.hh.resize(static_cast<size_t>(pr.m) * pr.k);
  pr.hw.resize(static_cast<size_t>(pr.vtot) * pr.k);
  for (auto& x : pr.hh) x = f2bf(static_cast<float>(rndn()));
  for (auto& x : pr.hw) x = f2bf(static_cast<float>(rndn() * 0.06));
  CK(cudaMalloc(&pr.h, pr.hh.size() * 2));
  CK(cudaMalloc(&pr.w, pr.hw.size() * 2));
  CK(cudaMemcpy(pr.h, pr.hh.data(), pr.hh.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(pr.w, pr.hw.data(), pr.hw.size() * 2, cudaMemcpyHostToDevice));
  return pr;
}

static ls::Params make_params(const Problem& pr, const Block& b, int cluster, float scale, float slack) {
  ls::Params p{};
  p.ta = tmap_bf16(pr.h, pr.k, pr.m, ls::kBM);
  p.tb = tmap_bf16(pr.w, pr.k, pr.vtot, ls::kBN / cluster);
  p.p = b.out;
  p.ldp = b.width;
  p.stats = b.stats;
  p.part = b.part;
  p.labels = b.labels;
  p.col0 = b.v0;
  p.ignore_index = -100;
  p.m = pr.m, p.width = b.width, p.k = pr.k, p.v0 = b.v0;
  p.tiles_m = b.tiles_m, p.tiles_n = b.tiles_n;
  p.scale = scale, p.slack = slack;
  p.c_exp = static_cast<float>(scale * 1.4426950408889634);
  p.log2_scale = static_cast<float>(std::log2(static_cast<double>(scale)));
  p.sums = g_sums;
  return p;
}

static bool g_overlap = false;  // cluster 1 only: the epilogue under the next tile's MMAs
template <int kMode>
static void launch_mode(const ls::Params& p, int cluster) {
  const int smem = ls::kSmemBytes;
  if (cluster == 1 && g_overlap) {
    const int grid = std::min(p.tiles_m * p.tiles_n, g_sms);
    CK(cudaFuncSetAttribute(ls::logits_softmax_kernel_c1<kMode, int64_t, true>,
                            cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    ls::logits_softmax_kernel_c1<kMode, int64_t, true><<<grid, ls::kThreads, smem>>>(p);
  } else if (cluster == 1) {
    const int grid = std::min(p.tiles_m * p.tiles_n, g_sms);
    CK(cudaFuncSetAttribute(ls::logits_softmax_kernel_c1<kMode, int64_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            smem));
    ls::logits_softmax_kernel_c1<kMode, int64_t><<<grid, ls::kThreads, smem>>>(p);
  } else {
    const int pairs = (p.tiles_m + 1) / 2 * p.tiles_n;
    const int grid = 2 * std::min(pairs, g_sms / 2);
    CK(cudaFuncSetAttribute(ls::logits_softmax_kernel_c2<kMode, int64_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            smem));
    ls::logits_softmax_kernel_c2<kMode, int64_t><<<grid, ls::kThreads, smem>>>(p);
  }
  CK(cudaGetLastError());
}
static void launch(const ls::Params& p, int cluster, int mode) {
  if (mode == ls::kModeCopy) {
    launch_mode<ls::kModeCopy>(p, cluster);
  } else if (mode == ls::kModeSoftmax) {
    launch_mode<ls::kModeSoftmax>(p, cluster);
  } else {
    launch_mode<ls::kModeDiscard>(p, cluster);
  }
}

static void cublas_z(cublasHandle_t hd, const Problem& pr, const Block& b) {
  const float one = 1.f, zero = 0.f;
  CB(cublasGemmEx(hd, CUBLAS_OP_T, CUBLAS_OP_N, b.width, pr.m, pr.k, &one, pr.w + static_cast<int64_t>(b.v0) * pr.k,
                  CUDA_R_16BF, pr.k, pr.h, CUDA_R_16BF, pr.k, &zero, b.out, CUDA_R_16BF, b.width,
                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

static Block make_block(const Problem& pr, int v0, int width) {
  Block b{};
  b.v0 = v0, b.width = width;
  b.tiles_m = (pr.m + ls::kBM - 1) / ls::kBM;
  b.tiles_n = (width + ls::kBN - 1) / ls::kBN;
  CK(cudaMalloc(&b.out, static_cast<size_t>(pr.m) * width * 2));
  CK(cudaMalloc(&b.stats, static_cast<size_t>(pr.m) * 6 * 4));
  CK(cudaMalloc(&b.part, static_cast<size_t>(pr.m) * b.tiles_n * 16));
  CK(cudaMalloc(&b.labels, static_cast<size_t>(pr.m) * 8));
  return b;
}
static void free_block(Block& b) {
  CK(cudaFree(b.out));
  CK(cudaFree(b.stats));
  CK(cudaFree(b.part));
  CK(cudaFree(b.labels));
}

static std::vector<uint16_t> fetch_u16(const uint16_t* d, size_t n) {
  std::vector<uint16_t> h(n);
  CK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
  return h;
}

// [1]: our z (copy mode) against cuBLAS's, as bf16 values; both accumulate in fp32 in different orders.
static bool check_z(cublasHandle_t hd, const Problem& pr, Block& b, int cluster) {
  cublas_z(hd, pr, b);
  CK(cudaDeviceSynchronize());
  const std::vector<uint16_t> ref = fetch_u16(b.out, static_cast<size_t>(pr.m) * b.width);
  CK(cudaMemset(b.out, 0xFF, static_cast<size_t>(pr.m) * b.width * 2));  // NaN everywhere first
  launch(make_params(pr, b, cluster, 1.f, 32.f), cluster, ls::kModeCopy);
  CK(cudaDeviceSynchronize());
  const std::vector<uint16_t> got = fetch_u16(b.out, static_cast<size_t>(pr.m) * b.width);
  double worst = 0;
  size_t bad = 0, diff = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float g = bf2f(got[i]), r = bf2f(ref[i]);
    if (!std::isfinite(g)) {
      ++bad;
      continue;
    }
    if (got[i] != ref[i]) ++diff;
    worst = std::max(worst, std::fabs(double(g) - r) / (std::fabs(double(r)) + 1e-2));
  }
  const bool ok = bad == 0 && worst < 2e-2;
  printf("  [1] z, cluster %d, block v0 %d width %d: %zu non-finite, %zu of %zu differ from cuBLAS by >= 1 ulp, "
         "worst rel %.2e: %s\n",
         cluster, b.v0, b.width, bad, diff, got.size(), worst, ok ? "PASS" : "FAIL");
  return ok;
}

// [2]: softmax mode against the host, from the z that copy mode produced (checked in [1]).
static bool check_softmax(const Problem& pr, Block& b, int cluster, float scale, float slack) {
  launch(make_params(pr, b, cluster, 1.f, slack), cluster, ls::kModeCopy);
  CK(cudaDeviceSynchronize());
  const std::vector<uint16_t> z = fetch_u16(b.out, static_cast<size_t>(pr.m) * b.width);
  // references: −inf, far below, near, above every tile max, and per-row values in between
  std::vector<float> st(static_cast<size_t>(pr.m) * 6);
  std::vector<int64_t> lab(pr.m);
  for (int r = 0; r < pr.m; ++r) {
    const float refs[6] = {-INFINITY, -1000.f, -40.f, 0.f, 3.f, 1000.f};
    st[r * 6 + 0] = refs[r % 6];
    for (int i = 1; i < 6; ++i) st[r * 6 + i] = 777.f;  // [4], [5] must stay unless the label is in the block
    const uint32_t u = rnd32();
    lab[r] = u % 7 == 0 ? -100 : static_cast<int64_t>(u % static_cast<uint32_t>(pr.vtot));
  }
  CK(cudaMemcpy(b.stats, st.data(), st.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(b.labels, lab.data(), lab.size() * 8, cudaMemcpyHostToDevice));
  CK(cudaMemset(b.out, 0xFF, static_cast<size_t>(pr.m) * b.width * 2));
  CK(cudaMemset(b.part, 0xFF, static_cast<size_t>(pr.m) * b.tiles_n * 16));
  launch(make_params(pr, b, cluster, scale, slack), cluster, ls::kModeSoftmax);
  CK(cudaDeviceSynchronize());
  const std::vector<uint16_t> P = fetch_u16(b.out, static_cast<size_t>(pr.m) * b.width);
  std::vector<float4> part(static_cast<size_t>(pr.m) * b.tiles_n);
  std::vector<float> st2(st.size());
  CK(cudaMemcpy(part.data(), b.part, part.size() * 16, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(st2.data(), b.stats, st2.size() * 4, cudaMemcpyDeviceToHost));
  size_t bad_p = 0, bad_part = 0, bad_lab = 0, flagged = 0;
  double worst_p = 0, worst_s = 0;
  for (int r = 0; r < pr.m; ++r) {
    const float ref = st[r * 6];
    for (int t = 0; t < b.tiles_n; ++t) {
      const int c0 = t * ls::kBN, c1 = std::min(b.width, c0 + ls::kBN);
      float bm = -INFINITY;
      for (int c = c0; c < c1; ++c) bm = std::max(bm, bf2f(z[(size_t)r * b.width + c]) * scale);
      const float use = bm > ref + slack ? bm : ref;
      flagged += use != ref;
      double s = 0, spz = 0, zs = 0;
      for (int c = c0; c < c1; ++c) {
        const float zz = bf2f(z[(size_t)r * b.width + c]) * scale;
        const double e = std::exp(double(zz) - use);
        s += e, spz += e * zz, zs += zz;
        const double want = e * scale, got = bf2f(P[(size_t)r * b.width + c]);
        const double err = std::fabs(got - want) / (std::fabs(want) + 1e-30);
        if (!(err < 1.2e-2) && !(want < 1e-30 && got < 1e-29)) ++bad_p;
        if (want > 1e-30) worst_p = std::max(worst_p, err);
      }
      const float4 g = part[(size_t)r * b.tiles_n + t];
      auto close = [](double got, double want, double scale_abs) {
        return std::fabs(got - want) <= 1e-4 * std::fabs(want) + 1e-5 * scale_abs + 1e-30;
      };
      const double es = s + 1.0;
      // sums not asked for are unspecified (partial tiles form them all)
      const bool bad_spz = (g_sums & ls::kSumEz) && !close(g.z, spz, es * 8);
      const bool bad_zs = (g_sums & ls::kSumZ) && !close(g.w, zs, 256.0 * 4);
      if (g.x != use || !close(g.y, s, es) || bad_spz || bad_zs) {
        if (bad_part < 5)
          printf("      row %d tile %d: got (%g %g %g %g) want (%g %g %g %g)\n", r, t, g.x, g.y, g.z, g.w, use, s,
                 spz, zs);
        ++bad_part;
      }
      worst_s = std::max(worst_s, std::fabs(g.y - s) / (s + 1e-30));
    }
    const int64_t l = lab[r];
    const bool in = l != -100 && l >= b.v0 && l < b.v0 + b.width;
    const float want4 = in ? bf2f(z[(size_t)r * b.width + (l - b.v0)]) * scale : 777.f;
    const float want5 = in ? scale : 777.f;
    if (st2[r * 6 + 4] != want4 || st2[r * 6 + 5] != want5 || st2[r * 6] != st[r * 6]) ++bad_lab;
  }
  const bool ok = bad_p == 0 && bad_part == 0 && bad_lab == 0;
  printf("  [2] softmax, cluster %d, sums %d, v0 %d width %d, scale %.3f slack %.0f: %zu flagged tiles; P bad %zu (worst rel "
         "%.2e), partials bad %zu (Σe worst rel %.2e), label stats bad %zu: %s\n",
         cluster, g_sums, b.v0, b.width, scale, slack, flagged, bad_p, worst_p, bad_part, worst_s, bad_lab,
         ok ? "PASS" : "FAIL");
  return ok;
}

struct Timer {
  uint4* flush = nullptr;
  size_t flush16 = 0;
  cudaEvent_t e0, e1;
  Timer() {
    const size_t bytes = 256ull << 20;
    CK(cudaMalloc(&flush, bytes));
    flush16 = bytes / 16;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
  }
  double run(const char* name, double flop, const std::function<void()>& f) {
    std::vector<double> v;
    for (int i = 0; i < 23; ++i) {
      flush_kernel<<<1056, 512>>>(flush, flush16, i);
      CK(cudaEventRecord(e0));
      f();
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms = 0.f;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 3) v.push_back(ms * 1000.0);
    }
    std::sort(v.begin(), v.end());
    const double med = v[v.size() / 2];
    printf("  %-44s median %8.1f us  min %8.1f us  %6.1f TFLOP/s\n", name, med, v[0], flop / (med * 1e-6) / 1e12);
    return med;
  }
};

// LSM_SANITIZE=1: the softmax checks [2] alone at a small shape, without cuBLAS, for compute-sanitizer's racecheck
// (which stops with an internal error at any cuBLAS GEMM on the H100, and so cannot reach this kernel through
// lm_head_blocks_, whose block 0 and accumulations are cuBLAS). Each variant the library or the micro builds: the
// overlapped consumer (the library's), the plain one, the 2-CTA cluster; a K tail (1000 = 15 k-tiles + 40), 200
// tokens (a tile's rows past M), a ragged last block, a block not starting on a tile, flagged and unflagged tiles.
static int sanitize_run() {
  Problem pr = make_problem(200, 1000, 2568);
  g_sms = 4;  // a few persistent CTAs, each through several tiles (the overlapped epilogue's tile-to-tile hand-off)
  Block mid = make_block(pr, 256, 1024), last = make_block(pr, 1280, 1288), odd = make_block(pr, 8, 8 * 37);
  bool ok = true;
  for (int variant : {0, 1, 2}) {  // overlapped (what lm_head_blocks_ runs), plain, cluster 2
    g_overlap = variant == 0;
    const int cl = variant == 2 ? 2 : 1;
    for (int sums : {static_cast<int>(ls::kSumZ | ls::kSumEz), 0}) {
      g_sums = sums;
      ok &= check_softmax(pr, mid, cl, 1.f, 32.f);
      ok &= check_softmax(pr, last, cl, 0.75f, 16.f);
    }
    ok &= check_softmax(pr, odd, cl, 1.f, 32.f);
  }
  free_block(mid);
  free_block(last);
  free_block(odd);
  CK(cudaFree(pr.h));
  CK(cudaFree(pr.w));
  printf("%s\n", ok ? "ALL CHECKS PASS" : "SOME CHECK FAILED");
  return ok ? 0 : 1;
}

int main() {
  CK(cudaSetDevice(0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  g_sms = prop.multiProcessorCount;
  printf("device: %s, %d SMs; kernel smem %d B\n", prop.name, g_sms, ls::kSmemBytes);
  if (getenv("LSM_SANITIZE")) return sanitize_run();
  cublasHandle_t hd;
  CB(cublasCreate(&hd));

  Problem pr = make_problem(2048, 2048, 8192 + 8192 + 5376);  // two full blocks and a ragged one (V = 21760)

  bool ok = true;
  if (getenv("LSM_PROFILE")) {  // one launch of each, for ncu: cuBLAS, then ours (cluster 1: copy, softmax)
    Block b = make_block(pr, 8192, 8192);
    cublas_z(hd, pr, b);
    for (int mode : {ls::kModeCopy, ls::kModeSoftmax}) launch(make_params(pr, b, 1, 1.f, 32.f), 1, mode);
    g_overlap = true;
    for (int mode : {ls::kModeCopy, ls::kModeSoftmax}) launch(make_params(pr, b, 1, 1.f, 32.f), 1, mode);
    g_overlap = false;
    CK(cudaDeviceSynchronize());
    free_block(b);
    return 0;
  }
  if (getenv("LSM_DISCARD")) {  // timing only: cuBLAS against the pipeline without any epilogue (this build's stages)
    Block b = make_block(pr, 8192, 8192);
    Timer tm;
    const double flop = 2.0 * pr.m * b.width * pr.k;
    const double t0 = tm.run("cuBLAS GEMM, width 8192", flop, [&] { cublas_z(hd, pr, b); });
    for (int cl : {1, 2}) {
      const ls::Params p = make_params(pr, b, cl, 1.f, 32.f);
      char name[96];
      snprintf(name, sizeof name, "ours cluster %d, %d stages, accumulators dropped", cl, ls::kStages);
      const double t = tm.run(name, flop, [&] { launch(p, cl, ls::kModeDiscard); });
      printf("      = %.3fx cuBLAS (%+.1f us)\n", t / t0, t - t0);
    }
    free_block(b);
    return 0;
  }
  Block full = make_block(pr, 8192, 8192);        // a middle block: W rows past the block exist (masked)
  Block ragged = make_block(pr, 16384, 5376);     // the last block: reaches V's end
  Block odd = make_block(pr, 8, 8 * 101);         // width not a multiple of 256; v0 not of 256
  printf("[1] z against cuBLAS\n");
  for (int cl : {1, 2}) {
    ok &= check_z(hd, pr, full, cl);
    ok &= check_z(hd, pr, ragged, cl);
    ok &= check_z(hd, pr, odd, cl);
  }
  printf("[1o] z against cuBLAS, overlapped epilogue (cluster 1)\n");
  g_overlap = true;
  ok &= check_z(hd, pr, full, 1);
  ok &= check_z(hd, pr, ragged, 1);
  ok &= check_z(hd, pr, odd, 1);
  printf("[2o] softmax epilogue against the host, overlapped (optional sums: all; none; Σz only)\n");
  ok &= check_softmax(pr, full, 1, 1.f, 32.f);
  ok &= check_softmax(pr, odd, 1, 0.75f, 16.f);
  ok &= check_softmax(pr, ragged, 1, 1.f, 32.f);
  for (int sums : {0, static_cast<int>(ls::kSumZ)}) {
    g_sums = sums;
    ok &= check_softmax(pr, full, 1, 1.f, 32.f);
    ok &= check_softmax(pr, odd, 1, 0.75f, 16.f);
  }
  g_sums = ls::kSumZ | ls::kSumEz;
  g_overlap = false;
  printf("[2] softmax epilogue against the host\n");
  for (int cl : {1, 2}) {
    ok &= check_softmax(pr, full, cl, 1.f, 32.f);
    ok &= check_softmax(pr, odd, cl, 0.75f, 16.f);
  }
  ok &= check_softmax(pr, ragged, 2, 1.f, 32.f);
  // an odd token count (tile rows past M; with clusters, a pair whose second CTA is all past M)
  {
    Problem p2 = pr;
    p2.m = 1000;
    Block b2 = make_block(p2, 8192, 8192);
    for (int cl : {1, 2}) {
      ok &= check_z(hd, p2, b2, cl);
      ok &= check_softmax(p2, b2, cl, 1.f, 32.f);
    }
    free_block(b2);
  }

  printf("[3] timing (M %d, K %d)\n", pr.m, pr.k);
  Timer tm;
  for (Block* b : {&full, &ragged}) {
    const double flop = 2.0 * pr.m * b->width * pr.k;
    char name[96];
    snprintf(name, sizeof name, "cuBLAS GEMM, width %d", b->width);
    const double t0 = tm.run(name, flop, [&] { cublas_z(hd, pr, *b); });
    for (int variant : {0, 1, 2, 3}) {  // cluster 1, cluster 1 overlapped, cluster 2, overlapped with Σe only
      g_sums = variant == 3 ? 0 : ls::kSumZ | ls::kSumEz;
      if (variant == 3) variant = 1;
      const int cl = variant == 2 ? 2 : 1;
      g_overlap = variant == 1;
      for (int mode : {ls::kModeCopy, ls::kModeSoftmax}) {
        const ls::Params p = make_params(pr, *b, cl, 1.f, 32.f);
        snprintf(name, sizeof name, "ours cluster %d%s %s%s", cl, g_overlap ? " overlapped" : "",
                 mode == ls::kModeCopy ? "copy z" : "softmax P", g_sums == 0 ? " (sum e only)" : "");
        const double t = tm.run(name, flop, [&] { launch(p, cl, mode); });
        printf("      = %.3fx cuBLAS (%+.1f us)\n", t / t0, t - t0);
      }
    }
    g_overlap = false;
    g_sums = ls::kSumZ | ls::kSumEz;
  }
  free_block(full);
  free_block(ragged);
  free_block(odd);
  printf("%s\n", ok ? "ALL CHECKS PASS" : "SOME CHECK FAILED");
  return ok ? 0 : 1;
}
