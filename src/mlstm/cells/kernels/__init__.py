"""cells/kernels"""
