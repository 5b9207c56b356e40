// Harness shared by the standalone NF4 GEMV (M = 1) benches gemv_bench.cu and gemv_small.cu (header-only; each
// program includes it and is its own translation unit; no torch): W [14336, 4096] NF4 (blocksize 64, nested absmax,
// bitsandbytes layout), device helpers, the flush / empty / fill kernels, the contiguous streaming-read kernel, the
// host data (one generator, one fixed seed) and double reference, the timing class, the correctness check and the
// table cells.
//
// Timing (every row): L2 flush (256 MiB write kernel) before each rep, outside the timed region, with no host sync
// between flush and the timed launch (the launch is queued behind the flush, as in torch/triton harnesses);
// cudaEvent record / launch / record; 3 warmups + 50 reps; median and min in microseconds. Bench::clean adds a
// 128 MiB read-back of the flush buffer after the flush (each program passes its own read-back launch), which
// leaves the L2 full of CLEAN lines.
//
// NF4 math (csrc/common/nf4.h): packed[j] = c_{2j} << 4 | c_{2j+1} (high nibble first); block b = 64 consecutive
// elements of the row-major flattened W; scale_b = fp32(code2[qabsmax[b]] * absmax2[b >> 8]) + offset;
// value = code[c] * scale_b. The reference rounds value to bf16 (as bitsandbytes' dequantize does) and sums in
// double. Kernels multiply the unscaled codes by x and apply the fp32 block scale to the block partial sum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../cuda_check.cuh"
#include "common/nf4.h"

// ----------------------------------------------------------------------------------------------- problem shape
constexpr int kN = 14336;
constexpr int kK = 4096;  // the GEMV kernels of both programs are specialised for K = 4096
constexpr int kRowBytes = kK / 2;                           // 2048
constexpr int kBlocksPerRow = kK / 64;                      // 64
constexpr size_t kPackedBytes = (size_t)kN * kK / 2;        // 29,360,128
constexpr size_t kQabsBytes = (size_t)kN * kK / 64;         // 917,504
constexpr size_t kStreamBytes = kPackedBytes + kQabsBytes;  // 30,277,632 (multiple of 16)
constexpr int kNumAbsmax2 = (int)(kQabsBytes / 256);        // 3,584
constexpr double kIssueFloorUs = 10.1;

// The 16 NF4 codes, exact fp32: the library's table (csrc/common/nf4.h). Each program declares its own device copy
// from this list (gemv_bench.cu: in __constant__ memory; gemv_small.cu: in global memory, read with __ldg); the
// host reference uses h_nf4.
#define GEMV_NF4_CODES {SWIFTLORA_NF4_CODE_VALUES}
static const float* const h_nf4 = swiftlora::nf4::kNF4Code;

// The GEMV operands (what gemv_small.cu's kernels take; gemv_bench.cu's GemvArgs extends it).
struct GemvOperands {
  const uint8_t* packed;
  const uint8_t* qabs;
  const float* absmax2;
  const float* code2;
  const float* offset;
  const __nv_bfloat16* x;
  __nv_bfloat16* y;
};

// ----------------------------------------------------------------------------------------------- device helpers
// 16-byte global loads that do not allocate in L1 (every byte is read once):
//   kNc      ld.global.nc (read-only path): the streaming-read kernels and gemv_bench.cu's GEMV loads.
//   kNcPf256 the same with the L2::256B prefetch hint (the `pf256` rows).
//   kWeak    a WEAK (not .nc) load, gemv_small.cu's GEMV weight load: ptxas may not sink it below the
//            __syncthreads() that follows the table build (it did sink 2 of the 4 .nc loads of gemv<4,4> past the
//            barrier, i.e. only 2 loads were in flight).
enum class Ld { kNc, kNcPf256, kWeak };

template <Ld P>
__device__ __forceinline__ uint4 ld128(const void* p) {
  uint4 v;
  if constexpr (P == Ld::kNcPf256) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  } else if constexpr (P == Ld::kNc) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  } else {
    asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  }
  return v;
}

// The .nc load, with (PF) or without the L2::256B hint.
template <bool PF = false>
__device__ __forceinline__ uint4 ldg128(const void* p) {
  return ld128<PF ? Ld::kNcPf256 : Ld::kNc>(p);
}

// The weak load (see kWeak).
__device__ __forceinline__ uint4 ldw128(const void* p) { return ld128<Ld::kWeak>(p); }

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ float bf_lo(uint32_t u) { return __uint_as_float(u << 16); }          // low bf16 -> f32
__device__ __forceinline__ float bf_hi(uint32_t u) { return __uint_as_float(u & 0xFFFF0000u); }  // high bf16

__device__ __forceinline__ float mul_ftz(float a, float b) {
  float r;
  asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float nested_scale(float code2v, float absmax2v, float offset) {
  return __fadd_rn(mul_ftz(code2v, absmax2v), offset);
}

// ----------------------------------------------------------------------------------------------- flush / misc
__global__ void flush_kernel(uint4* p, size_t n16, uint32_t v) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += stride) p[i] = make_uint4(v, v, v, v);
}

__global__ void empty_kernel() {}

__global__ void fill_bf16_kernel(__nv_bfloat16* p, int n, uint16_t bits) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = __ushort_as_bfloat16(bits);
}

// ----------------------------------------------------------------------------------------------- streaming read
__device__ __forceinline__ void finish_sum(uint32_t acc, uint32_t* out) {
  acc = __reduce_add_sync(0xffffffffu, acc);
  if ((threadIdx.x & 31) == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) >> 5] = acc;
}

__device__ __forceinline__ uint32_t fold(const uint4& v) { return (v.x + v.y) ^ (v.z + v.w); }

// Folds the 16-B elements i, i + stride, ... < end of p, with U loads in flight per thread (the body of every LDG
// streaming-read kernel).
template <int U, bool PF>
__device__ __forceinline__ uint32_t fold_range(const uint4* __restrict__ p, size_t i, size_t end, size_t stride) {
  uint32_t acc = 0;
  for (; i + (U - 1) * stride < end; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = ldg128<PF>(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < U; ++u) acc += fold(v[u]);
  }
  for (; i < end; i += stride) acc += fold(ldg128<PF>(p + i));
  return acc;
}

// Contiguous: CTA c owns 16-B elements [c*per, (c+1)*per), read block-stride with U loads in flight per thread.
template <int U, bool PF = false>
__global__ void stream_ct(const uint4* __restrict__ p, size_t n, size_t per, uint32_t* out) {
  const size_t beg = (size_t)blockIdx.x * per;
  const size_t end = min(n, beg + per);
  finish_sum(fold_range<U, PF>(p, beg + threadIdx.x, end, blockDim.x), out);
}

// ----------------------------------------------------------------------------------------------- host
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd32() {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return (uint32_t)(g_rng >> 16);
}
static double rnd01() { return (rnd32() + 0.5) / 4294967296.0; }

static uint16_t f2bf(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static float bf2f(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Device 0, its properties and the clocks / bus width each program prints.
struct Device {
  cudaDeviceProp prop;
  int sms = 0, clk_khz = 0, memclk_khz = 0, bus = 0;
};

// Opens device 0 and prints its line (with the opt-in shared memory per block where show_smem_optin). Returns false,
// after printing not_sm90_line, where it is not sm_90 (the programs are built for sm_90a).
static bool open_device(Device& d, bool show_smem_optin, const char* not_sm90_line) {
  int dev = 0;
  CK(cudaSetDevice(dev));
  CK(cudaGetDeviceProperties(&d.prop, dev));
  d.sms = d.prop.multiProcessorCount;
  cudaDeviceGetAttribute(&d.clk_khz, cudaDevAttrClockRate, dev);
  cudaDeviceGetAttribute(&d.memclk_khz, cudaDevAttrMemoryClockRate, dev);
  cudaDeviceGetAttribute(&d.bus, cudaDevAttrGlobalMemoryBusWidth, dev);
  const cudaDeviceProp& p = d.prop;
  printf("device: %s, %d SMs, sm_%d%d, ", p.name, d.sms, p.major, p.minor);
  if (show_smem_optin) printf("smem/block optin %zu B, ", p.sharedMemPerBlockOptin);
  printf("L2 %d B, SM clock %.0f MHz, mem %.0f MHz x %d bit\n", p.l2CacheSize, d.clk_khz / 1e3, d.memclk_khz / 1e3,
         d.bus);
  if (p.major != 9) {
    printf("%s", not_sm90_line);
    return false;
  }
  return true;
}

// The inputs (host and device) and the host double reference.
struct Problem {
  std::vector<uint8_t> h_buf;  // packed codes followed by qabsmax: ONE allocation (the stream rows read exactly it)
  std::vector<float> h_code2, h_a2;
  float h_off = 0.f;
  std::vector<uint16_t> h_x;
  std::vector<double> y_ref;
  double ref_max = 0.0;
  uint8_t* d_buf = nullptr;
  float *d_code2 = nullptr, *d_a2 = nullptr, *d_off = nullptr;
  __nv_bfloat16 *d_x = nullptr, *d_y = nullptr;
  uint32_t* d_out = nullptr;  // the stream kernels' per-warp sums
  GemvOperands operands() const { return {d_buf, d_buf + kPackedBytes, d_a2, d_code2, d_off, d_x, d_y}; }
};

static Problem make_problem() {
  Problem P;
  P.h_buf.resize(kStreamBytes);
  for (size_t i = 0; i < kStreamBytes; ++i) P.h_buf[i] = (uint8_t)(rnd32() >> 7);
  P.h_code2.resize(256);
  P.h_a2.resize(kNumAbsmax2);
  for (int i = 0; i < 256; ++i) P.h_code2[i] = (float)(-1.0 + 2.0 * i / 255.0);  // sorted map in [-1, 1]
  for (int i = 0; i < kNumAbsmax2; ++i) P.h_a2[i] = (float)(0.02 * (1.0 + rnd01()));
  P.h_off = 0.06f;  // scales in [0.02, 0.10]
  P.h_x.resize(kK);
  for (int k = 0; k < kK; ++k) {
    const double u1 = rnd01(), u2 = rnd01();
    P.h_x[k] = f2bf((float)(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2)));
  }

  CK(cudaMalloc(&P.d_buf, kStreamBytes));
  CK(cudaMalloc(&P.d_code2, 256 * 4));
  CK(cudaMalloc(&P.d_a2, kNumAbsmax2 * 4));
  CK(cudaMalloc(&P.d_off, 4));
  CK(cudaMalloc(&P.d_x, kK * 2));
  CK(cudaMalloc(&P.d_y, kN * 2));
  CK(cudaMalloc(&P.d_out, 1 << 22));
  CK(cudaMemcpy(P.d_buf, P.h_buf.data(), kStreamBytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_code2, P.h_code2.data(), 256 * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_a2, P.h_a2.data(), kNumAbsmax2 * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_off, &P.h_off, 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(P.d_x, P.h_x.data(), kK * 2, cudaMemcpyHostToDevice));

  // host reference: y[n] = sum_k x[k] * bf16(code[c] * scale_b), in double
  P.y_ref.resize(kN);
  const uint8_t* pk = P.h_buf.data();
  const uint8_t* qa = P.h_buf.data() + kPackedBytes;
  std::vector<double> xd(kK);
  for (int k = 0; k < kK; ++k) xd[k] = bf2f(P.h_x[k]);
  for (int n = 0; n < kN; ++n) {
    double acc = 0.0;
    for (int kb = 0; kb < kBlocksPerRow; ++kb) {
      const size_t b = (size_t)n * kBlocksPerRow + kb;
      const float prod = P.h_code2[qa[b]] * P.h_a2[b >> 8];  // fp32, rounded (normal values: ftz irrelevant)
      const float scale = prod + P.h_off;
      for (int m = 0; m < 32; ++m) {
        const uint8_t byte = pk[b * 32 + m];
        const int k = kb * 64 + 2 * m;
        const float w0 = bf2f(f2bf(h_nf4[byte >> 4] * scale));
        const float w1 = bf2f(f2bf(h_nf4[byte & 15] * scale));
        acc += xd[k] * w0 + xd[k + 1] * w1;
      }
    }
    P.y_ref[n] = acc;
  }
  for (int n = 0; n < kN; ++n) P.ref_max = std::max(P.ref_max, std::fabs(P.y_ref[n]));
  return P;
}

struct Stat {
  double med, mn;
};

struct Row {
  std::string name, note;
  Stat st;
  bool is_gemv;
  std::string check, res;  // gemv rows: the correctness cell; res: a resources cell (gemv_small.cu)
  std::function<void()> launch;
  Stat clean{0, 0};
};

// Launches the clean-L2 read-back: (flush buffer, 16-B elements to read, scratch output).
using ReadBack = std::function<void(const uint4*, size_t, uint32_t*)>;

struct Bench {
  uint4* flush = nullptr;
  size_t flush16 = 0;
  cudaEvent_t e0, e1;
  uint32_t rep = 0;
  int reps = 50;
  uint32_t* scratch = nullptr;
  bool clean = false;  // after the write flush, read 128 MiB of it back: L2 left full of CLEAN lines
  ReadBack read_back;
  std::vector<Row> rows;
  explicit Bench(ReadBack rb) : read_back(std::move(rb)) {
    const size_t bytes = 256ull << 20;
    CK(cudaMalloc(&flush, bytes));
    flush16 = bytes / 16;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaMalloc(&scratch, 1 << 20));
  }
  void do_flush() {
    flush_kernel<<<1056, 512>>>(flush, flush16, ++rep);
    if (clean) read_back(flush, flush16 / 2, scratch);
    CK(cudaGetLastError());
  }
  Stat time(const std::function<void()>& launch) {
    for (int i = 0; i < 3; ++i) {
      do_flush();
      launch();
    }
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<double> v;
    for (int i = 0; i < reps; ++i) {
      do_flush();
      CK(cudaEventRecord(e0));
      launch();
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms = 0.f;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      v.push_back(ms * 1000.0);
    }
    CK(cudaGetLastError());
    std::sort(v.begin(), v.end());
    return {v[v.size() / 2], v[0]};
  }
  void add_stream(const std::string& name, const std::string& note, const std::function<void()>& l) {
    rows.push_back({name, note, time(l), false, "", "", l});
  }
  // Every row again with the L2 left clean (write flush + read-back): what the dirty-L2 write-backs cost.
  void time_clean() {
    clean = true;
    for (Row& r : rows) r.clean = time(r.launch);
    clean = false;
  }
};

// ----------------------------------------------------------------------------------------------- correctness
// Poisons y (a bf16 NaN), runs `launch` once and copies y back.
static void run_poisoned(const Problem& P, const std::function<void()>& launch, std::vector<uint16_t>& y) {
  fill_bf16_kernel<<<(kN + 255) / 256, 256>>>(P.d_y, kN, 0x7FC1);
  launch();
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpy(y.data(), P.d_y, kN * 2, cudaMemcpyDeviceToHost));
}

// PASS: y finite, max|y - y_ref| / max|y_ref| <= 1e-2, and no failure `flag` found by the caller (its table tag and
// FAIL-line text). Returns the table's check cell; a failure also prints the loud FAIL line and sets any_fail.
static std::string check_gemv(const Problem& P, const std::string& name, const std::vector<uint16_t>& y, bool flag,
                              const char* flag_tag, const char* flag_msg, int& any_fail) {
  double maxerr = 0.0;
  bool finite = true;
  for (int n = 0; n < kN; ++n) {
    const double v = bf2f(y[n]);
    if (!std::isfinite(v)) finite = false;
    maxerr = std::max(maxerr, std::fabs(v - P.y_ref[n]));
  }
  const double rel = maxerr / P.ref_max;
  const bool ok = finite && !flag && rel <= 1e-2;
  char buf[160];
  snprintf(buf, sizeof buf, "%s rel %.2e%s%s", ok ? "PASS" : "FAIL", rel, finite ? "" : " NONFINITE",
           flag ? flag_tag : "");
  if (!ok) {
    any_fail = 1;
    printf("\n!!!!!!!!!! FAIL: %s: max|err| %.4e / max|y_ref| %.4e = %.3e (tol 1e-2)%s%s !!!!!!!!!!\n\n",
           name.c_str(), maxerr, P.ref_max, rel, finite ? "" : ", non-finite output", flag ? flag_msg : "");
  }
  return buf;
}

// ----------------------------------------------------------------------------------------------- table
static void print_bytes_line(double ref_max) {
  const double mb = kStreamBytes / 1e6;
  printf("\nbytes per call: %.3f MB (packed %.3f + qabsmax %.3f); issue floor %.1f us; ref max|y| %.3f\n", mb,
         kPackedBytes / 1e6, kQabsBytes / 1e6, kIssueFloorUs, ref_max);
}

// A row's GB/s, %stream (floor_stream / median) and %10.1us cells; "-" for the empty kernel.
struct Cells {
  char gbs[32] = "-", pst[32] = "-", pfl[32] = "-";
};

static Cells row_cells(const Row& r, double floor_stream) {
  Cells c;
  if (r.name != "empty kernel") {
    const double mb = kStreamBytes / 1e6;
    snprintf(c.gbs, sizeof c.gbs, "%.0f", mb / r.st.med * 1e3);
    snprintf(c.pst, sizeof c.pst, "%.1f%%", 100.0 * floor_stream / r.st.med);
    snprintf(c.pfl, sizeof c.pfl, "%.1f%%", 100.0 * kIssueFloorUs / r.st.med);
  }
  return c;
}

static int print_result(int any_fail) {
  printf(any_fail ? "\nRESULT: FAIL (see !!! lines above)\n" : "\nRESULT: all gemv kernels PASS correctness\n");
  return any_fail;
}
