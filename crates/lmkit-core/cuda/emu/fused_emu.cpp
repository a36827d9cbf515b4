// fused.cu compiled for the CPU emulator (the `cuda-emu` feature).
#define LMKIT_EMU 1
#include "../fused.cu"

// Referenced by emu.cpp so that the linker keeps this object (and its kernels' registrations)
// out of the static library.
extern "C" void lmkit_emu_fused_anchor() {}
