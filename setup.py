"""Build papa and its C++/CUDA extension `papa._C`.

    pip install --no-build-isolation -e .

The extension always has its CPU kernels. Its CUDA kernels are compiled too when the installed torch is a CUDA build
and nvcc is found (this works on a machine without a GPU: the kernels are compiled and linked, they simply never run
there). Set PAPA_BUILD_CUDA=0 to skip them, PAPA_BUILD_EXT=0 to build no extension at all (papa then runs on its
plain-torch ops). Build isolation must stay off, so the extension is compiled against the torch you run.
"""
import glob
import os

from setuptools import setup


def extensions():
    if os.environ.get("PAPA_BUILD_EXT", "1") == "0":
        return [], {}
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # torch would otherwise guess /usr/local from nvcc on PATH
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-std=c++20", "-DPAPA_PYTHON_MODULE"]
    sources = ["csrc/ops.cpp"]
    want_cuda = os.environ.get("PAPA_BUILD_CUDA", "1") != "0"
    if want_cuda and torch.version.cuda and CUDA_HOME:
        # without a visible GPU torch cannot guess the architecture: default to Hopper (the H100/H200 papa is
        # benchmarked on); set TORCH_CUDA_ARCH_LIST yourself for other GPUs
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        # the CUDA wheels keep cusparse.h & co. under site-packages/nvidia/cu*/include
        nv = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
        ext = CUDAExtension("papa._C", sources + ["csrc/step_cuda.cu"], include_dirs=[os.path.abspath("csrc")] + nv,
                            extra_compile_args={"cxx": cxx + ["-DPAPA_WITH_CUDA"], "nvcc": ["-O3", "-std=c++20"]})
    else:
        ext = CppExtension("papa._C", sources, include_dirs=[os.path.abspath("csrc")], extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
