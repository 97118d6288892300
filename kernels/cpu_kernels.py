"""Quiver's own CPU kernels (cpu_kernels.cpp: a decode step's few-row bfloat16 projections, paged attention and
the KV write, RMS norm, rope, the MLP's activation, LoRA and a greedy step's argmax, each one op where torch
takes several, and every layer of a plain decoder in one call), compiled once per machine and torch build with
the system's C++ compiler for this CPU (-march=native, linked to torch's own OpenMP), cached under
QUIVER_CACHE/cpu_kernels, and loaded as torch ops (torch.ops.quiver_cpu.*). Without a compiler, or if the build
fails, available() is False with one log line and every caller keeps its torch ops: the same maths, slower.

QUIVER_CPU_KERNELS=0 turns them off (to compare against torch's ops, or to rule them out).
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import weakref
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
BLOCK = 64  # output rows per block of the layout
# rows up to which a bfloat16 projection takes quiver_cpu::linear: at 1-8 rows 1.1-1.6x oneDNN's speed on
# SmolLM2's projections and head (AVX512-BF16 EPYC, 2 threads), at 16 even, beyond oneDNN's GEMM wins
FEW_ROWS = 8


def cache_root() -> Path:
    """Where Quiver keeps what it builds or converts once per machine: $QUIVER_CACHE, else the user's cache
    folder's quiver/ (the one rule for every cache: converted GGUFs, these kernels, inductor's code)."""
    root = os.environ.get("QUIVER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quiver")
    return Path(root)


def _compile_command(out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths
    lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [os.environ.get("CXX") or "g++", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()), str(SOURCE), "-o", str(out),
            f"-L{lib}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def _library_path() -> Path:
    """Where this source, torch build and CPU's library lives (one file per combination)."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + platform.processor().encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
    return cache_root() / "cpu_kernels" / key / "quiver_cpu.so"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(path: Path) -> None:
    """Compile into path, one process at a time (a lock file beside it); another's finished build is reused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(_compile_command(partial), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr.strip()[-2000:])
        partial.rename(path)


@functools.cache
def available() -> bool:
    """The ops are loaded (built first when this machine has none cached)."""
    if os.environ.get("QUIVER_CPU_KERNELS", "1") == "0" or platform.system() != "Linux":
        return False
    cxx = os.environ.get("CXX") or "g++"
    if not shutil.which(cxx):
        log.warning("no C++ compiler (%s): decode steps use torch's ops only (slower at few rows)", cxx)
        return False
    path = _library_path()
    try:
        if not path.exists():
            log.info("building Quiver's CPU kernels into %s (once per machine)", path.parent)
            _build(path)
        torch.ops.load_library(str(path))
    except (RuntimeError, OSError) as e:
        log.warning("Quiver's CPU kernels did not build (%s): decode steps use torch's ops only", e)
        return False
    return True


def fast() -> bool:
    """Loaded, and built with AVX512-BF16 dot products (without them oneDNN is faster: serving keeps it)."""
    return available() and torch.ops.quiver_cpu.fast()


def blocked(weight: torch.Tensor) -> torch.Tensor:
    """A [n, k] weight in quiver_cpu::linear's layout [ceil(n/64), ceil(k/32) * 16, 64, 2], zero-padded."""
    n, k = weight.shape
    rows, cols = -(-n // BLOCK) * BLOCK, -(-k // 32) * 32
    padded = weight.new_zeros(rows, cols)
    padded[:n, :k] = weight
    return padded.view(rows // BLOCK, BLOCK, cols // 2, 2).permute(0, 2, 1, 3).contiguous()


def onednn_blocks(packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed copy of `weight` (mkldnn._reorder_linear_weight) seen in place as quiver_cpu::linear's
    layout, when it is that layout (AVX512-BF16 CPUs; checked against `weight` in full), else None. The view
    shares oneDNN's memory: keep `packed` alive as long as it."""
    if weight.dtype != torch.bfloat16 or not fast():
        return None
    expected = blocked(weight)
    if torch.ops.mkldnn._nbytes(packed) != expected.numel() * 2:
        return None
    memory = (ctypes.c_int16 * expected.numel()).from_address(torch.ops.mkldnn.data_ptr(packed))
    view = torch.frombuffer(memory, dtype=torch.int16).view(torch.bfloat16).view(expected.shape)
    return view if torch.equal(view, expected) else None


def serves(x: torch.Tensor) -> bool:
    """x's op can take a kernel of this file: on the CPU, the kernels loaded, not inside a torch.compile trace
    (inductor fuses those ops itself, and these have no meta functions)."""
    return not torch.compiler.is_compiling() and x.device.type == "cpu" and available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, fp32_product: bool) -> torch.Tensor:
    """server.model.llama.rms_norm in one op."""
    return torch.ops.quiver_cpu.rms_norm(x, weight, eps, offset, fp32_product)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """server.model.rope.apply_rope in one op."""
    return torch.ops.quiver_cpu.rope(x, cos, sin)


def lora_add_(y, x, a, b, token_slots: torch.Tensor, offsets: tuple[int, ...], rank: int) -> None:
    """y += B_s A_s x per row (slot s = token_slots[row], -1: none), B block-diagonal: torch_ops.lora_apply's
    maths in float32, rounded once into y."""
    torch.ops.quiver_cpu.lora_add_(y, x, a, b, token_slots, list(offsets), rank)


def write_kv_(k_cache, v_cache, k, v, slot_mapping) -> None:
    """torch_ops.write_kv in one op."""
    torch.ops.quiver_cpu.write_kv_(k_cache, v_cache, k, v, slot_mapping)


ACT_KINDS = {"silu": 0, "gelu_pytorch_tanh": 1}


def act_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of a fused [T, 2I] gate/up projection in one op (activation: a key of ACT_KINDS)."""
    return torch.ops.quiver_cpu.act_mul(gate_up, ACT_KINDS[activation])


class DecodePlan:
    """A model's per-layer tensors as decode_layers reads them (quiver_cpu::decode_plan: cpu_kernels.cpp says
    what it takes), checked once; the kernel's copy is freed with this object."""

    def __init__(self, *args):
        self.id = torch.ops.quiver_cpu.decode_plan(*args)
        weakref.finalize(self, torch.ops.quiver_cpu.decode_plan_free, self.id)


def decode_layers(plan: DecodePlan, *args) -> torch.Tensor:
    """Every layer of a pre-norm decoder for a few-row step in one call (cpu_kernels.cpp says what it takes)."""
    return torch.ops.quiver_cpu.decode_layers(plan.id, *args)


def paged_attention(q, k_cache, v_cache, block_tables, allowed, scale: float, softcap: float | None) -> torch.Tensor:
    """torch_ops.paged_attention's contract and few_query_attention's roundings, keys read in place."""
    return torch.ops.quiver_cpu.paged_attention(q, k_cache, v_cache, block_tables, allowed, scale, softcap or 0.0)


def linear(x: torch.Tensor, blocks: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, k] bf16 -> x W^T + bias [M, n], W [n, k] held as `blocks` (blocked)."""
    return torch.ops.quiver_cpu.linear(x, blocks, n, bias)


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] float32 -> (argmax of each row, the first of equal maxima; whether the row is all finite)."""
    return torch.ops.quiver_cpu.greedy(logits)
