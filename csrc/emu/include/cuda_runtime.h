// Shim for the emulator (csrc/emu/hetlora_emu.h): what the hetlora kernels use of the CUDA runtime.
#pragma once
#include "../hetlora_emu.h"
