"""papa's Triton kernels, imported as `papa_kernels` (a top-level `kernels` would clash with the PyPI package of that
name). Each kernel sits beside its plain-torch `*_ref` twin, which is the test oracle and the fallback."""
