"""papa's Triton kernels, imported as `papa_kernels` (a top-level `kernels` would clash with the PyPI package of that
name). Each kernel's plain-torch twin, its test oracle and fallback, is in `papa.ops_ref`, which does not import
triton; `papa.ops` is the public entry point and imports these modules only when it runs a Triton kernel."""
