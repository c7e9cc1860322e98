"""Native kernels (XLA FFI custom calls) that replace XLA-generated code where it is slow."""
