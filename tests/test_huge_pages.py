"""A CPU model's packed projections on 2 MiB pages (server.model.huge_pages): the memory a step streams is
remapped in place, its contents unchanged."""
from __future__ import annotations

import ctypes
import mmap
import sys

import pytest
import torch
from helpers import make_tiny_model

from quiver.kernels import cpu_kernels
from quiver.kernels.ops import ops_for
from quiver.server.model import huge_pages, llama, packed
from quiver.server.model.config import ModelConfig

MiB = 2**20


def huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping that holds `address` (/proc/self/smaps), in bytes."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def collapse_works() -> bool:
    """This kernel collapses a private anonymous range on request (Linux 6.1+, huge pages not `never`)."""
    if not sys.platform.startswith("linux"):
        return False
    probe = mmap.mmap(-1, 4 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    probe.write(b"\1" * (4 * MiB))
    view = ctypes.c_char.from_buffer(probe)
    address = ctypes.addressof(view)
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    first_page = -(-address // (2 * MiB)) * 2 * MiB
    works = madvise(first_page, 2 * MiB, 25) == 0 and huge_bytes_at(address) > 0  # 25: MADV_COLLAPSE, asked
    # directly, so that a mistake in huge_pages fails these tests rather than skips them
    del view
    probe.close()
    return works


needs_collapse = pytest.mark.skipif(not collapse_works(), reason="this kernel has no MADV_COLLAPSE (Linux 6.1+)")


@needs_collapse
def test_collapse_keeps_the_contents_and_maps_huge_pages():
    region = mmap.mmap(-1, 12 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # a mapping of its own: 4 KiB
    x = torch.frombuffer(region, dtype=torch.float32)  # pages, as freed memory reused from the heap may not be
    x.copy_(torch.randn(x.numel()))
    before, huge_before = x.clone(), huge_bytes_at(x.data_ptr())
    huge_pages.collapse([(x.data_ptr(), x.nbytes)])
    assert torch.equal(x, before)
    assert huge_bytes_at(x.data_ptr()) - huge_before >= 10 * MiB  # at least the whole 2 MiB pages inside it
    del x
    region.close()


@needs_collapse
@pytest.mark.skipif(not cpu_kernels.fast(), reason="only the few-row kernel's packed copies go on huge pages")
@pytest.mark.parametrize("huge", [True, False])
def test_a_loaded_model_streams_its_projections_from_huge_pages(tmp_path, monkeypatch, huge):
    asked = []
    monkeypatch.setattr(packed, "collapse", lambda spans: (asked.extend(spans), huge_pages.collapse(spans)))
    # a head of 16384 x 256 bfloat16 is 8 MiB: whole 2 MiB pages lie inside it whatever its alignment
    make_tiny_model(tmp_path, "llama_gqa", vocab_size=16384, hidden_size=256, intermediate_size=512)
    model = llama.LlamaModel(ModelConfig.from_dir(tmp_path), ops_for("cpu"), torch.bfloat16, huge_pages=huge)
    model.load_weights(tmp_path)
    weights = [getattr(layer, g) for layer in model.layers for g in ("qkv", "o", "gate_up", "down")]
    weights.append(model.packed_head)
    assert sorted(asked) == (sorted(w.span for w in weights) if huge else [])  # --no-huge-pages: none asked
    address, nbytes = model.packed_head.span
    assert nbytes == 8 * MiB
    if huge:
        assert huge_bytes_at(address + nbytes // 2) >= 6 * MiB
