/*
 * zsbir_kernels: fused top-k search kernels for zero-shot SBIR galleries (C ABI).
 *
 * Every function takes DEVICE pointers to contiguous row-major arrays, sizes, k and a
 * cudaStream_t (passed as void*; NULL = legacy default stream) and returns a status code
 * (ZSBIR_OK = 0). Work is enqueued on the stream; nothing synchronises the host.
 * zsbir_status_string() turns any code into a message.
 *
 * Result layout (both searches): row q of the outputs holds the k best gallery rows for query q,
 * best first. Ties are broken by the smaller gallery index, so the order is fully deterministic.
 * When k > N, the first N slots are valid and the rest are padding:
 *   index -1, score -INFINITY (inner product) / distance INT32_MAX (Hamming).
 * A NaN score ranks like -INFINITY; -0.0 ranks like +0.0.
 *
 * Limits: 0 <= Q, N < 2^31; 1 <= D <= 2048; 1 <= k <= 1024;
 * Hamming code_bytes a multiple of 8 in [8, 128] (64 to 1024 bits), code pointers 8-byte aligned.
 */
#ifndef ZSBIR_KERNELS_H
#define ZSBIR_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ZSBIR_KERNELS_ABI_VERSION 1

#if defined(__GNUC__)
#define ZSBIR_API __attribute__((visibility("default")))
#else
#define ZSBIR_API
#endif

enum zsbir_status {
  ZSBIR_OK = 0,
  ZSBIR_ERR_NULL_POINTER = 1,     /* a required pointer is NULL */
  ZSBIR_ERR_BAD_SHAPE = 2,        /* Q or N negative or >= 2^31 */
  ZSBIR_ERR_BAD_DIM = 3,          /* D outside [1, 2048] */
  ZSBIR_ERR_BAD_K = 4,            /* k outside [1, 1024] */
  ZSBIR_ERR_BAD_CODE_BYTES = 5,   /* code_bytes not a multiple of 8 in [8, 128] */
  ZSBIR_ERR_BAD_DTYPE = 6,        /* unknown gallery dtype, or int8 without scales */
  ZSBIR_ERR_MISALIGNED = 7,       /* Hamming codes not 8-byte aligned */
  ZSBIR_ERR_UNSUPPORTED = 8,      /* a forced path cannot serve this k / device */
  ZSBIR_ERR_SHARED_MEMORY = 9,    /* the configuration needs more shared memory than the device has */
  ZSBIR_ERR_BAD_PATH = 10,        /* unknown path selector */
  ZSBIR_ERR_CUDA_BASE = 1000      /* ZSBIR_ERR_CUDA_BASE + cudaError_t: a CUDA runtime error */
};

/* Gallery element types for zsbir_topk_ip. */
enum zsbir_gallery_dtype { ZSBIR_GALLERY_F16 = 0, ZSBIR_GALLERY_I8 = 1 };

/* Kernel path for zsbir_topk_ip: auto, CUDA-core streaming (GEMV-like), tensor-core tiles (64 queries per
 * block where shared memory allows, else 32), and tensor-core tiles of 32 queries per block (a tuning
 * option: half the shared memory, twice the gallery reads). Tensor paths serve k <= 256. */
enum zsbir_ip_path { ZSBIR_PATH_AUTO = 0, ZSBIR_PATH_SIMT = 1, ZSBIR_PATH_TENSOR = 2, ZSBIR_PATH_TENSOR_QT32 = 3 };

/* ABI version of the loaded library (ZSBIR_KERNELS_ABI_VERSION). */
ZSBIR_API int zsbir_abi_version(void);

/* Human-readable message for a status code (static storage, never NULL). */
ZSBIR_API const char* zsbir_status_string(int code);

/*
 * Inner-product top-k.
 *   queries   [Q, D] float16
 *   gallery   [N, D] float16 (dtype ZSBIR_GALLERY_F16) or int8 (ZSBIR_GALLERY_I8)
 *   scales    [N] float32, required for int8 (score = scales[n] * sum_d q[d] * g[n, d]), else NULL
 *   out_scores [Q, k] float32, out_indices [Q, k] int64
 * Products are accumulated in float32. May be NULL when Q == 0 or (for gallery/scales) N == 0.
 * Temporary workspace is taken from the stream-ordered allocator (cudaMallocAsync) on `stream`.
 */
ZSBIR_API int zsbir_topk_ip(const void* queries, const void* gallery, const float* scales, int gallery_dtype,
                            int64_t num_queries, int64_t num_gallery, int64_t dim, int64_t k, float* out_scores,
                            int64_t* out_indices, int path, void* stream);

/*
 * Hamming top-k (smallest distance first).
 *   query_codes [Q, code_bytes] uint8, codes [N, code_bytes] uint8 (packed bits)
 *   out_distances [Q, k] int32, out_indices [Q, k] int64
 */
ZSBIR_API int zsbir_hamming_topk(const void* query_codes, const void* codes, int64_t num_queries,
                                 int64_t num_codes, int64_t code_bytes, int64_t k, int32_t* out_distances,
                                 int64_t* out_indices, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* ZSBIR_KERNELS_H */
