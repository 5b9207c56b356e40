// Standalone bench: NF4 GEMV M = 1 with SMALL ONE-PASS CTAs (the read pattern of "ldg small 256thr u2", the
// fastest streaming read measured on the H100), W [14336, 4096] NF4 blocksize 64, nested absmax, bitsandbytes layout.
// No torch. Build: bash bench/micro/nf4_gemv_floor/run.sh (nvcc -I csrc)
//
// Harness shared with gemv_bench.cu in gemv_common.cuh (same data generator and seed, same host double reference,
// same timing: 256 MiB write flush before each rep outside the events, no host sync between the flush and the timed
// launch, events around ONE launch, 3 warmups + 50 reps, median / min). A second timing per row with the L2 left
// clean (write flush + 128 MiB read-back) is printed as one extra column.
//
// GEMV layout (all variants): CTA = W warps, owns R consecutive complete rows, one pass, then exits.
//   Warp w owns K slice [w*4096/W, (w+1)*4096/W) of every row of the CTA = bytes [w*S, (w+1)*S) of each packed row,
//   S = 2048/W. LPR = S/16 lanes cover one row's slice with 16-byte loads (lane c = lane % LPR at byte w*S + 16c),
//   so one warp load instruction covers RPI = 32/LPR rows (row u*RPI + lane/LPR for load u), fully coalesced
//   (contiguous 16*LPR-byte segments). Every lane issues all its L = R/RPI 16-byte loads first (plus its L qabsmax
//   bytes and absmax2 floats), then loads its 32 x values (64 B, bf16 -> fp32 into 32 registers, L1-cached: x is
//   the same 8 KB for every CTA), builds the decode table, and only then consumes the weights.
//   Each lane's 16 bytes = 32 codes = half of one absmax block: fp32 partial over 32 codes (2 FFMA chains),
//   multiplied once by the block scale fp32(code2[q] * absmax2[row>>2]) + offset; xor-shuffle sum over the LPR
//   lanes of the row; per-warp row partials meet in shared memory and are summed in fixed warp order (deterministic).
//   T16  : 16-entry fp32 code table in shared memory (64 B; every entry in its own bank, so any access pattern is
//          conflict-free: distinct lanes hitting one bank read the same word = broadcast). Per byte: 2 nibble
//          address ops (SHF + LOP3) x2, 2 LDS.32, 2 FFMA. Codes exact fp32.
//   PAIR : 256-entry byte -> (bf16 code_hi, bf16 code_lo) table replicated per lane (row e at e*128 + 4*lane,
//          32 KB per CTA, conflict-free). Per byte: SHF + LOP3 (address), 1 LDS.32, SHL + LOP3 (bf16 -> fp32),
//          2 FFMA. Half the shared-memory wavefronts of T16, at the price of building 32 KB per CTA.
#include "gemv_common.cuh"

// The NF4 codes in global memory (the table build reads them with __ldg).
__device__ const float g_nf4[16] = GEMV_NF4_CODES;

// ----------------------------------------------------------------------------------------------- GEMV: small CTAs
constexpr size_t kPairTableBytes = 256 * 32 * 4;  // 32 KB

template <int W, int R, bool PAIR>
__global__ void __launch_bounds__(W * 32) gemv_small(GemvOperands a) {
  constexpr int kSlice = kRowBytes / W;  // bytes of each row owned by one warp
  constexpr int LPR = kSlice / 16;       // lanes per row
  constexpr int RPI = 32 / LPR;          // rows per warp load instruction
  constexpr int L = R / RPI;             // 16-B loads per lane
  static_assert(LPR >= 1 && LPR <= 32 && 32 % LPR == 0 && R % RPI == 0 && L >= 1, "geometry");
  __shared__ float s_tab[16];
  __shared__ float s_red[W][R];
  extern __shared__ __align__(16) uint32_t s_pair[];  // PAIR only: [256 rows][32 lanes] u32

  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int c = lane % LPR, rr = lane / LPR;
  const int boff = w * kSlice + 16 * c;  // byte offset inside a packed row; multiple of 16
  const int row0 = blockIdx.x * R;

  // 1) all weight loads first (weak loads, ldw128: all L stay in flight across the table build's barrier), then
  //    the scale inputs
  uint4 p[L];
#pragma unroll
  for (int u = 0; u < L; ++u) p[u] = ldw128(a.packed + (size_t)(row0 + u * RPI + rr) * kRowBytes + boff);
  uint32_t q[L];
  float a2[L];
#pragma unroll
  for (int u = 0; u < L; ++u) {
    const int row = row0 + u * RPI + rr;
    q[u] = __ldg(a.qabs + (size_t)row * kBlocksPerRow + (boff >> 5));
    a2[u] = __ldg(a.absmax2 + (row >> 2));  // 64 blocks per row, 256 per absmax2 group: 4 rows share one
  }
  // 2) x for this lane's 32 codes k0 = 2*boff .. k0+31 (bf16 at byte 4*boff), to fp32 registers
  float xr[32];
  {
    const uint4* xp = reinterpret_cast<const uint4*>(a.x) + (boff >> 2);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const uint4 qq = __ldg(xp + v);
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const uint32_t pr = word_of(qq, h);  // x[8v+2h] in the low half, x[8v+2h+1] in the high half
        xr[8 * v + 2 * h] = bf_lo(pr);
        xr[8 * v + 2 * h + 1] = bf_hi(pr);
      }
    }
  }
  const float off = __ldg(a.offset);
  // 3) decode table(s)
  if (tid < 16) s_tab[tid] = __ldg(g_nf4 + tid);
  if constexpr (PAIR) {
    __syncthreads();
    uint4* t4 = reinterpret_cast<uint4*>(s_pair);
    for (int i = tid; i < 256 * 8; i += W * 32) {  // uint4 i = row e, lanes 4*(i&7) .. +3
      const int e = i >> 3;
      const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(s_tab[e >> 4]));  // first code (k even)
      const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(s_tab[e & 15]));  // second code (k odd)
      const uint32_t v = hi | (lo << 16);
      t4[i] = make_uint4(v, v, v, v);
    }
  }
  __syncthreads();

  // 4) consume: per load, 16 bytes = 32 codes = half of block (boff >> 5) of that row
  const char* tabc = reinterpret_cast<const char*>(s_tab);
  const char* pairc = reinterpret_cast<const char*>(s_pair) + lane * 4;
  float part[L];
#pragma unroll
  for (int u = 0; u < L; ++u) {
    float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t wd = word_of(p[u], i);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int m = 4 * i + j;  // byte m of the 16: codes k0 + 2m (high nibble), k0 + 2m + 1 (low nibble)
        float vh, vl;
        if constexpr (PAIR) {
          const uint32_t o = (j == 0 ? (wd << 7) : (wd >> (8 * j - 7))) & 0x7F80u;  // byte * 128
          const uint32_t e = *reinterpret_cast<const uint32_t*>(pairc + o);
          vh = bf_lo(e);
          vl = bf_hi(e);
        } else {
          const uint32_t oh = (wd >> (8 * j + 2)) & 0x3Cu;                          // high nibble * 4
          const uint32_t ol = (j == 0 ? (wd << 2) : (wd >> (8 * j - 2))) & 0x3Cu;  // low nibble * 4
          vh = *reinterpret_cast<const float*>(tabc + oh);
          vl = *reinterpret_cast<const float*>(tabc + ol);
        }
        acc0 = fmaf(vh, xr[2 * m], acc0);
        acc1 = fmaf(vl, xr[2 * m + 1], acc1);
      }
    }
    const float sc = nested_scale(__ldg(a.code2 + q[u]), a2[u], off);
    part[u] = (acc0 + acc1) * sc;
  }
  // 5) row sums: LPR lanes (aligned group) by xor shuffles, then W warps through shared memory in fixed order
#pragma unroll
  for (int u = 0; u < L; ++u) {
#pragma unroll
    for (int m = LPR / 2; m >= 1; m >>= 1) part[u] += __shfl_xor_sync(0xffffffffu, part[u], m);
  }
  if (c == 0) {
#pragma unroll
    for (int u = 0; u < L; ++u) s_red[w][u * RPI + rr] = part[u];
  }
  __syncthreads();
  if (tid < R) {
    float s = 0.f;
#pragma unroll
    for (int ww = 0; ww < W; ++ww) s += s_red[ww][tid];
    a.y[row0 + tid] = __float2bfloat16_rn(s);
  }
}

int main() {
  Device dv;
  if (!open_device(dv, false, "\n!!!!!!!!!! FAIL: this bench needs sm_90 (built for sm_90a) !!!!!!!!!!\n")) return 1;

  // ---- data (identical generator and seed to gemv_bench.cu) and the host reference
  const Problem P = make_problem();

  // clean-L2 read-back: small one-pass CTAs (256 threads x 4 loads)
  Bench bench([](const uint4* p, size_t n, uint32_t* out) {
    const size_t per = 1024;
    stream_ct<4><<<(unsigned)((n + per - 1) / per), 256>>>(p, n, per, out);
  });
  std::vector<Row>& rows = bench.rows;
  const uint4* src16 = reinterpret_cast<const uint4*>(P.d_buf);
  const size_t n16 = kStreamBytes / 16;

  // ---- references: empty kernel and the small-CTA streaming reads
  auto add_stream = [&](const std::string& name, const std::string& note, const std::function<void()>& l) {
    bench.add_stream(name, note, l);
  };
  add_stream("empty kernel", "<<<1,32>>>, no work", [&] { empty_kernel<<<1, 32>>>(); });
  {
    const size_t per2 = 256 * 2, per4 = 256 * 4, per4s = 128 * 4;
    const int g2 = (int)((n16 + per2 - 1) / per2), g4 = (int)((n16 + per4 - 1) / per4),
              g4s = (int)((n16 + per4s - 1) / per4s);
    add_stream("ldg small 256thr u2", std::to_string(g2) + " CTAs x 8 KB, 1 pass (gemv_bench's floor row)",
               [&, per2, g2] { stream_ct<2><<<g2, 256>>>(src16, n16, per2, P.d_out); });
    add_stream("ldg small 256thr u4", std::to_string(g4) + " CTAs x 16 KB, 1 pass",
               [&, per4, g4] { stream_ct<4><<<g4, 256>>>(src16, n16, per4, P.d_out); });
    add_stream("ldg small 128thr u4", std::to_string(g4s) + " CTAs x 8 KB, 1 pass",
               [&, per4s, g4s] { stream_ct<4><<<g4s, 128>>>(src16, n16, per4s, P.d_out); });
  }

  // ---- GEMV variants
  GemvOperands ga = P.operands();
  std::vector<uint16_t> h_y(kN), h_y2(kN);
  int any_fail = 0;
  auto add_gemv = [&](const std::string& name, const std::string& note, const void* fn, int W, int R, bool pair) {
    if (kN % R != 0) {
      printf("\n!!!!!!!!!! FAIL: %s: N %% R != 0 !!!!!!!!!!\n", name.c_str());
      any_fail = 1;
      return;
    }
    const size_t dsm = pair ? kPairTableBytes : 0;
    const int grid = kN / R, threads = W * 32;
    cudaFuncAttributes fa;
    CK(cudaFuncGetAttributes(&fa, fn));
    int occ = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, threads, dsm));
    char res[160];
    snprintf(res, sizeof res, "%3d regs %2d lmem %5.1fKB smem %2d CTA/SM %4d CTAs", fa.numRegs,
             (int)fa.localSizeBytes, (fa.sharedSizeBytes + dsm) / 1024.0, occ, grid);
    auto launch = [&, fn, grid, threads, dsm] {
      void* args[] = {&ga};
      CK(cudaLaunchKernel(fn, dim3(grid), dim3(threads), args, dsm, 0));
    };
    // correctness: poison y, run, compare; run again (poisoned) and require bit-identical output
    run_poisoned(P, launch, h_y);
    run_poisoned(P, launch, h_y2);
    const bool det = memcmp(h_y.data(), h_y2.data(), kN * 2) == 0;
    const std::string check = check_gemv(P, name, h_y, !det, " NONDET", ", two runs differ", any_fail);
    rows.push_back({name, note, bench.time(launch), true, check, res, launch});
  };
  add_gemv("gemv t16 w4 r4", "128 thr, 1 row/load instr, 4 loads/lane (8 KB/CTA)", (const void*)gemv_small<4, 4, false>,
           4, 4, false);
  add_gemv("gemv t16 w4 r8", "128 thr, 8 loads/lane (16 KB/CTA)", (const void*)gemv_small<4, 8, false>, 4, 8, false);
  add_gemv("gemv t16 w8 r8", "256 thr, 2 rows/instr, 4 loads/lane (16 KB/CTA)", (const void*)gemv_small<8, 8, false>,
           8, 8, false);
  add_gemv("gemv t16 w8 r16", "256 thr, 8 loads/lane (32 KB/CTA)", (const void*)gemv_small<8, 16, false>, 8, 16,
           false);
  add_gemv("gemv t16 w16 r16", "512 thr, 4 rows/instr, 4 loads/lane (32 KB/CTA)",
           (const void*)gemv_small<16, 16, false>, 16, 16, false);
  add_gemv("gemv pair w8 r16", "as t16 w8 r16, per-lane bf16-pair table (32 KB smem/CTA)",
           (const void*)gemv_small<8, 16, true>, 8, 16, true);

  // ---- clean-L2 timing of every row
  bench.time_clean();

  // ---- table
  const Row* ref = nullptr;
  for (const Row& r : rows)
    if (r.name == "ldg small 256thr u2") ref = &r;
  const double floor_stream = ref->st.med;
  print_bytes_line(P.ref_max);
  printf("%%stream = (ldg small 256thr u2 median %.2f us) / row median; %%10.1us = 10.1 / row median\n\n",
         floor_stream);
  printf("%-20s %8s %8s %7s %8s %8s %9s  %-16s %-44s %s\n", "kernel", "med us", "min us", "GB/s", "%stream", "%10.1us",
         "clean med", "check", "resources", "notes");
  printf("%s\n", std::string(170, '-').c_str());
  const Row* best = nullptr;
  for (const Row& r : rows) {
    const Cells c = row_cells(r, floor_stream);
    printf("%-20s %8.2f %8.2f %7s %8s %8s %9.2f  %-16s %-44s %s\n", r.name.c_str(), r.st.med, r.st.mn, c.gbs, c.pst,
           c.pfl, r.clean.med, r.is_gemv ? r.check.c_str() : "", r.res.c_str(), r.note.c_str());
    if (r.is_gemv && r.check.rfind("PASS", 0) == 0 && (!best || r.st.med < best->st.med)) best = &r;
  }
  printf("\nGB/s = 30.278 MB / median wall (includes launch overhead; compare 'empty kernel'). 'clean med': same\n"
         "launch with the L2 left clean (write flush + 128 MiB read-back). Earlier H100 runs (gemv_bench.cu): gemv tc u4\n"
         "22.05 us, library kernel ~22.3 us, ldg small 256thr u2 15.46 us.\n");
  if (best)
    printf("best passing gemv: %s %.2f us median (%.1f%% of the stream row, +%.2f us)\n", best->name.c_str(),
           best->st.med, 100.0 * floor_stream / best->st.med, best->st.med - floor_stream);
  return print_result(any_fail);
}
