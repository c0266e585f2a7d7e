"""Every number of the MXFP4 format, named once.

Kernels, the torch reference and the tests import these; none of them writes a
bare 127, 6.0 or 0x7 of its own.
"""

# FP4 E2M1 element: sign << 3 | magnitude index.
F4_E2M1_MAX = 6.0  # largest magnitude
F4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of index m
F4_E2M1_SIGN_BIT = 0x8  # bit 3 of a code
F4_E2M1_MAG_MASK = 0x7  # bits 0-2 of a code
F4_E2M1_EMAX = 2  # floor(log2(F4_E2M1_MAX))
F4_E2M1_MANTISSA_BITS = 1
F4_CODES_PER_BYTE = 2  # element 2i in the low nibble, 2i+1 in the high nibble
F4_NIBBLE_BITS = 4
F4_NIBBLE_MASK = 0xF

# UE8M0 block scale: one unsigned byte e, value 2**(e - E8M0_BIAS).
E8M0_BIAS = 127
E8M0_MIN = 0  # smallest finite scale byte, 2**-127
E8M0_MAX = 254  # largest finite scale byte, 2**127
E8M0_NAN = 255  # the block held NaN or Inf
# The largest byte a quantizer emits: every value of its grid, up to 6 * 2**125,
# is a finite float32 (bf16 has the same range). Byte 253 would let a block whose
# amax is near float32's max round to 4 * 2**126 = inf; naive never goes above it.
E8M0_MAX_QUANTIZE = 252

# IEEE float32 fields used to read exponents exactly.
F32_EXP_BIAS = 127
F32_MANTISSA_BITS = 23
F32_EXP_MASK = 0xFF  # after shifting right by F32_MANTISSA_BITS
F32_ABS_MASK = 0x7FFFFFFF
F32_SIGN_SHIFT = 31
F32_EXP_NONFINITE = 0xFF  # exponent field of Inf and NaN
F4_SIGN_TO_F32_SHIFT = F32_SIGN_SHIFT - 3  # code bit 3 (F4_E2M1_SIGN_BIT) <-> float32 bit 31
BF16_SHIFT = 16  # bfloat16 is the top 16 bits of a float32

BLOCK_SIZES = (32, 16)
DEFAULT_BLOCK_SIZE = 32

# Weights for the weighted mse search are rescaled by a power of two so their
# largest is in [1, 2); relative weights below this are treated as zero, which
# keeps every squared-error term a normal float32 on every backend.
MSE_WEIGHT_RELATIVE_FLOOR = 2.0**-60

BITS_PER_WEIGHT = {bs: 4 + 8 / bs for bs in BLOCK_SIZES}  # 4.25 for 32, 4.5 for 16
