"""Builds ddrl_engine._C from csrc/ (flags and source globs live in csrc/build_config.json).

Environment:
  DDRL_ENGINE_CUDA=0        force a CPU-only build even when nvcc is found
  TORCH_CUDA_ARCH_LIST      CUDA archs (default "9.0a"; e.g. "8.0;9.0a" to add A100)
  CUDA_HOME                 the CUDA toolkit (default: what torch finds, e.g. /usr/local/cuda)
  MAX_JOBS                  parallel compile jobs (ninja)
The sm_90a fp8 attention kernel is built when the nvidia-cutlass wheel is importable (CuTe headers)
and TORCH_CUDA_ARCH_LIST has 9.0a; _build_info.json records whether it was and why not.
"""
import glob
import json
import os
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a symlink outside the
# toolkit (e.g. /usr/local/bin/nvcc); prefer the standard prefix when nothing was set.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

ROOT = Path(__file__).parent
CONFIG = json.loads((ROOT / "csrc" / "build_config.json").read_text())


def sources(patterns):
    return sorted(str(p) for pattern in patterns for p in glob.glob(str(ROOT / pattern)))


def nvcc_version():
    nvcc = Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc"
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out else "unknown"


def want_cuda():
    if os.environ.get("DDRL_ENGINE_CUDA", "1") == "0":
        return False, "DDRL_ENGINE_CUDA=0"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    import torch

    if torch.version.cuda is None:
        return False, "the installed torch is a CPU-only build"
    return True, ""


def cutlass_include():
    """The CUTLASS/CuTe headers of the nvidia-cutlass wheel, or (None, why not)."""
    try:
        import cutlass_library
    except ImportError:
        return None, "the nvidia-cutlass wheel is not installed (pip install nvidia-cutlass)"
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    if not (path / "cute" / "tensor.hpp").exists():
        return None, f"nvidia-cutlass has no CuTe headers at {path}"
    return str(path), ""


def want_fp8_sm90():
    if not WITH_CUDA:
        return None, f"no CUDA build ({NO_CUDA_REASON})"
    arch = CONFIG["fp8_sm90_arch"]
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";").split(";")
    if arch not in [a.removesuffix("+PTX") for a in archs]:
        return None, f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} lacks {arch}"
    return cutlass_include()


WITH_CUDA, NO_CUDA_REASON = want_cuda()
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CONFIG["default_cuda_arch_list"])
CUTLASS_INCLUDE, NO_FP8_SM90_REASON = want_fp8_sm90()


BUILD_INFO = "_build_info.json"


def build_info() -> dict:
    """What the extension is built against: the one definition of ddrl_engine/_build_info.json."""
    import torch

    return {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "with_cuda": WITH_CUDA,
        "no_cuda_reason": NO_CUDA_REASON,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else "",
        "nvcc": nvcc_version() if WITH_CUDA else "",
        "cxx_flags": CONFIG["cxx_flags"],
        "nvcc_flags": CONFIG["nvcc_flags"] if WITH_CUDA else [],
        "fp8_attention_kernel": CUTLASS_INCLUDE is not None,
        "fp8_attention_kernel_reason": NO_FP8_SM90_REASON,
    }


class BuildExtension(cpp_extension.BuildExtension):
    """Also writes _build_info.json next to the built extension, wherever that goes: into build_lib
    for a wheel (build_py has already copied the package there, so writing into the source tree
    would miss the wheel), and into the source tree too for an in-place or editable build."""

    def _build_info_paths(self) -> tuple[str, str]:
        """(the file in build_lib, its in-place equivalent in the source package)."""
        package_dir = self.get_finalized_command("build_py").get_package_dir("ddrl_engine")
        return os.path.join(self.build_lib, "ddrl_engine", BUILD_INFO), os.path.join(package_dir, BUILD_INFO)

    def run(self):
        super().run()  # after the build: a failed build leaves no info describing an extension it did not make
        text = json.dumps(build_info(), indent=2) + "\n"
        regular, inplace = self._build_info_paths()
        for path in (regular, inplace) if self.inplace else (regular,):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            Path(path).write_text(text)

    def get_outputs(self):
        if self.inplace:  # setuptools lists the keys of get_output_mapping()
            return super().get_outputs()
        return super().get_outputs() + [self._build_info_paths()[0]]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace:  # editable installs (strict mode) map build_lib files to the source tree
            regular, inplace = self._build_info_paths()
            mapping[regular] = inplace
        return mapping


def extension():
    include_dirs = [str(ROOT / d) for d in CONFIG["include_dirs"]]
    extra = {"cxx": CONFIG["cxx_flags"]}
    srcs = sources(CONFIG["cpu_sources"])
    if WITH_CUDA:
        srcs += sources(CONFIG["cuda_sources"])
        extra["nvcc"] = list(CONFIG["nvcc_flags"])
        make = cpp_extension.CUDAExtension
        if CUTLASS_INCLUDE is not None:
            srcs += sources(CONFIG["fp8_sm90_sources"])
            include_dirs.append(CUTLASS_INCLUDE)
            define = f"-D{CONFIG['fp8_sm90_define']}=1"
            extra = {"cxx": extra["cxx"] + [define], "nvcc": extra["nvcc"] + [define]}
    else:
        make = cpp_extension.CppExtension
    return make(
        "ddrl_engine._C",
        [os.path.relpath(s, ROOT) for s in srcs],
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=CONFIG["link_flags"],
    )


setup(
    packages=find_packages(include=["ddrl_engine", "ddrl_engine.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    # _build_info.json is written by BuildExtension (git-ignored); listed so it always ships.
    package_data={"ddrl_engine": ["configs/*.toml", BUILD_INFO]},
)
