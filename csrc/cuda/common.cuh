// Device helpers shared by cogview's CUDA kernels: element types, vector loads and stores,
// run-time typed loads, and deterministic warp/row-group reductions.
//
// Elements are handled as raw bits (uint16_t / uint32_t / uint64_t) and converted explicitly,
// so the code does not depend on the __half/__nv_bfloat16 operator macros torch builds with.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace cogview::cuda {

// Element kinds passed at run time (small tensors: weights, gradients of unusual dtype).
enum class Kind : int32_t { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

// ---- element types: storage bits <-> accumulator -------------------------------------------

struct F32 {
  using bits = uint32_t;
  static constexpr Kind kind = Kind::f32;
  __device__ __forceinline__ static float to_float(bits b) { return __uint_as_float(b); }
  template <typename acc_t>
  __device__ __forceinline__ static bits from_acc(acc_t v) {
    return __float_as_uint(static_cast<float>(v));
  }
};

struct F16 {
  using bits = uint16_t;
  static constexpr Kind kind = Kind::f16;
  __device__ __forceinline__ static float to_float(bits b) { return __half2float(__ushort_as_half(b)); }
  template <typename acc_t>
  __device__ __forceinline__ static bits from_acc(acc_t v) {
    return __half_as_ushort(__float2half_rn(static_cast<float>(v)));
  }
};

struct BF16 {
  using bits = uint16_t;
  static constexpr Kind kind = Kind::bf16;
  // Exact: a bfloat16 is the upper half of a float.
  __device__ __forceinline__ static float to_float(bits b) {
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
  }
  template <typename acc_t>
  __device__ __forceinline__ static bits from_acc(acc_t v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<float>(v)));
  }
};

struct F64 {
  using bits = unsigned long long;
  static constexpr Kind kind = Kind::f64;
  __device__ __forceinline__ static double to_float(bits b) { return __longlong_as_double(static_cast<long long>(b)); }
  template <typename acc_t>
  __device__ __forceinline__ static bits from_acc(acc_t v) {
    return static_cast<bits>(__double_as_longlong(static_cast<double>(v)));
  }
};

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t to_acc(typename T::bits b) {
  return static_cast<acc_t>(T::to_float(b));
}

// ---- vector loads and stores ---------------------------------------------------------------

// VEC elements of type T moved as one aligned pack: 16-byte (or smaller) accesses. The pointer
// must be aligned to min(16, VEC * sizeof(T::bits)) bytes (the launchers check this).
template <typename T, int VEC>
struct Pack {
  static constexpr int kBytes = VEC * static_cast<int>(sizeof(typename T::bits));
  static constexpr int kAlign = kBytes < 16 ? kBytes : 16;
  struct alignas(kAlign) Type {
    typename T::bits v[VEC];
  };
};

template <typename T, int VEC, typename acc_t>
__device__ __forceinline__ void load_vec(const void* base, int64_t offset, acc_t (&out)[VEC]) {
  using P = typename Pack<T, VEC>::Type;
  const P pack = *reinterpret_cast<const P*>(static_cast<const typename T::bits*>(base) + offset);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_acc<T, acc_t>(pack.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void load_raw(const void* base, int64_t offset, typename T::bits (&out)[VEC]) {
  using P = typename Pack<T, VEC>::Type;
  const P pack = *reinterpret_cast<const P*>(static_cast<const typename T::bits*>(base) + offset);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = pack.v[i];
}

template <typename T, int VEC, typename acc_t>
__device__ __forceinline__ void store_vec(void* base, int64_t offset, const acc_t (&in)[VEC]) {
  using P = typename Pack<T, VEC>::Type;
  P pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = T::from_acc(in[i]);
  *reinterpret_cast<P*>(static_cast<typename T::bits*>(base) + offset) = pack;
}

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t load_one(const void* base, int64_t offset) {
  return to_acc<T, acc_t>(static_cast<const typename T::bits*>(base)[offset]);
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store_one(void* base, int64_t offset, acc_t v) {
  static_cast<typename T::bits*>(base)[offset] = T::from_acc(v);
}

// ---- run-time typed access (the kind is uniform across a launch: no divergence) ------------

struct Ref {
  const void* ptr = nullptr;
  Kind kind = Kind::f32;
};

template <int VEC, typename acc_t>
__device__ __forceinline__ void load_vec_dyn(Ref r, int64_t offset, acc_t (&out)[VEC]) {
  switch (r.kind) {
    case Kind::f16: load_vec<F16, VEC>(r.ptr, offset, out); break;
    case Kind::bf16: load_vec<BF16, VEC>(r.ptr, offset, out); break;
    case Kind::f64: load_vec<F64, VEC>(r.ptr, offset, out); break;
    default: load_vec<F32, VEC>(r.ptr, offset, out); break;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_one_dyn(Ref r, int64_t offset) {
  switch (r.kind) {
    case Kind::f16: return load_one<F16, acc_t>(r.ptr, offset);
    case Kind::bf16: return load_one<BF16, acc_t>(r.ptr, offset);
    case Kind::f64: return load_one<F64, acc_t>(r.ptr, offset);
    default: return load_one<F32, acc_t>(r.ptr, offset);
  }
}

// VEC consecutive elements from `offset`: one pack when `aligned`, else element by element.
template <int VEC, typename acc_t>
__device__ __forceinline__ void load_vec_dyn_maybe(Ref r, int64_t offset, bool aligned, acc_t (&out)[VEC]) {
  if (aligned) {
    load_vec_dyn<VEC>(r, offset, out);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = load_one_dyn<acc_t>(r, offset + i);
  }
}

// ---- reductions ------------------------------------------------------------------------------

// Butterfly (xor) reductions leave the bitwise identical result in every lane: at each step lanes
// i and i^m combine the same two values, and + and max are commutative.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Max of non-negative values; NaN never wins (like the CPU kernel's `a > m ? a : m`).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, m);
    v = o > v ? o : v;
  }
  return v;
}

constexpr int kMaxWarpsPerBlock = 16;  // every cogview LayerNorm launch has <= 512 threads

// Shared scratch for reductions over a row group (blockDim.x threads = `warps` warps working on
// one row; blockDim.y groups per block). Two slots used alternately: between a reduction's
// reads of one slot and the next write to it there is always the other slot's barrier.
template <typename acc_t>
struct GroupReducer {
  acc_t (*scratch)[kMaxWarpsPerBlock][2];  // [2 slots][warps in block][2 values]
  int slot;
  int warps;  // warps per row group
  int warp;   // warp index in the block
  int lane;
  int first;  // first warp of this thread's row group

  // Reduces (a, b) over the row group: a by sum, b by sum or (kMaxB) max. Every thread of the
  // block must call it (it may contain __syncthreads); all threads of a group get the same
  // bits, combined in a fixed order.
  template <bool kMaxB>
  __device__ __forceinline__ void reduce(acc_t& a, acc_t& b) {
    a = warp_sum(a);
    b = kMaxB ? warp_max(b) : warp_sum(b);
    if (warps == 1) return;
    acc_t(*buf)[2] = scratch[slot];
    if (lane == 0) {
      buf[warp][0] = a;
      buf[warp][1] = b;
    }
    __syncthreads();
    a = buf[first][0];
    b = buf[first][1];
    for (int i = 1; i < warps; ++i) {
      a += buf[first + i][0];
      const acc_t o = buf[first + i][1];
      b = kMaxB ? (o > b ? o : b) : b + o;
    }
    slot ^= 1;
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t device_sqrt(acc_t v);
template <>
__device__ __forceinline__ float device_sqrt<float>(float v) { return sqrtf(v); }
template <>
__device__ __forceinline__ double device_sqrt<double>(double v) { return sqrt(v); }

__device__ __forceinline__ float device_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double device_abs(double v) { return fabs(v); }

}  // namespace cogview::cuda
