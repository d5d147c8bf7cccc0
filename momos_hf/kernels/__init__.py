"""Compiled products: the CPU lookup (`cpu`, C++ built at first use) and the Triton kernels (`triton_mosaic`)."""
