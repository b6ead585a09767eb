// The CPU build of the CUDA extension, for tests without a GPU: the launchers and the very
// same kernel sources, compiled by the host compiler against the emulator (emulate.h).
#define MOE_EMULATE
#include "../ops.cpp"
#include "../router.cu"
#include "../permute.cu"
#include "../grouped_gemm.cu"
#include "../norm.cu"
