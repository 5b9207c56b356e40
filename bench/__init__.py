"""swiftlora's benchmarks: `python -m bench.kernels` (kernels against the reference and peers). See NOTES.md."""
