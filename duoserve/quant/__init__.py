"""4-bit expert weights: the int4 format, checkpoint conversion, and GPU kernels."""
