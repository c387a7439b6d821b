"""difill.kernels"""
