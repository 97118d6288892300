"""Compile every Triton kernel of kernels/ for CUDA targets with no GPU, and check each fits the target's
shared memory: python triton_compile.py 80 89 90. Prints one line per kernel and variant."""
from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# usable shared memory per block (bytes) on each compute capability
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def signatures(p: str, prec, upcast: bool):
    from quiver.kernels import attention_triton as at
    from quiver.kernels import lora_triton as lt
    from quiver.kernels import nf4_triton as nt

    seg = {"m_tiles_ptr": "*i32", "seg_index_ptr": "*i64", "seg_starts_ptr": "*i64", "seg_lens_ptr": "*i64",
           "seg_slots_ptr": "*i64"}
    tiles = {"tile_slice_ptr": "*i32", "tile_n0_ptr": "*i32", "slice_end_ptr": "*i32"}
    gather = {"tokens_ptr": "*i64", "slots_ptr": "*i64"}
    lora = dict(PRECISION=prec, UPCAST=upcast)
    outs = (("", p), ("_split", "*fp32"))  # each shrink writes the input dtype, or split-K's fp32 partials
    attention = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "out_ptr": p, "part_ptr": "*fp32", "ml_ptr": "*fp32",
                 "tiles_ptr": "*i32", "tables_ptr": "*i64",
                 **{k: "*i64" for k in ("q_off_ptr", "q_start_ptr", "q_lens_ptr", "kv_off_ptr", "prefix_ptr")},
                 "scale": "fp32", "window": "i32", "softcap": "fp32", "GROUP": "i32", "D": "i32",
                 **{k: "i32" for k in ("stride_qt", "stride_qh", "stride_kh", "stride_kb", "stride_ks", "stride_tb",
                                       "stride_ot", "stride_oh", "pairs")}}
    dtype = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16}[p]
    shrink = {"K": "i32", "N": "i32", "K_CHUNK": "i32", "stride_xt": "i32", "stride_al": "i32", "stride_an": "i32",
              "stride_os": "i32", "stride_ot": "i32"}
    return [
        *[(f"shrink_sgmv{tag}", lt._shrink_sgmv, {"x_ptr": p, "a_ptr": p, "out_ptr": out, **seg, **shrink},
           dict(BLOCK_M=lt.BLOCK_M, BLOCK_N=lt.BLOCK_N, BLOCK_K=lt.BLOCK_K, **lora)) for tag, out in outs],
        ("expand_sgmv", lt._expand_sgmv, {"xa_ptr": p, "b_ptr": p, "y_ptr": p, **seg, **tiles, "R": "i32",
                                          "stride_xat": "i32", "stride_bl": "i32", "stride_br": "i32",
                                          "stride_yt": "i32"},
         dict(BLOCK_M=lt.BLOCK_M, BLOCK_N=lt.BLOCK_N, BLOCK_R=lt.BLOCK_R, **lora)),
        *[(f"shrink_bgmv{tag}", lt._shrink_bgmv, {"x_ptr": p, "a_ptr": p, "out_ptr": out, **gather, **shrink},
           dict(BLOCK_N=lt.BLOCK_N, BLOCK_K=lt.BLOCK_K)) for tag, out in outs],
        ("expand_bgmv", lt._expand_bgmv, {"xa_ptr": p, "b_ptr": p, "y_ptr": p, **gather, **tiles, "R": "i32",
                                          "stride_xat": "i32", "stride_bl": "i32", "stride_br": "i32",
                                          "stride_yt": "i32"},
         dict(BLOCK_N=lt.BLOCK_N, BLOCK_R=lt.BLOCK_R)),
        *[(f"attention_d{d}{tag}", at._prefix_paged_attention, attention,
           dict(BLOCK_SIZE=16, BLOCK_M=at.BLOCK_M, BLOCK_N=cfg.pop("BLOCK_N"), BLOCK_D=d, PRECISION=prec,
                UPCAST=upcast, WINDOWED=bool(tag), SOFTCAP=bool(tag)), cfg)  # cfg: the rest of the launch table
          for d, tag in ((64, ""), (128, ""), (256, "_window_softcap")) for cfg in [at.config(d, dtype)]],
        ("dequantize_4bit", nt._dequantize_4bit, {"data_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
                                                  "out_ptr": p, "n": "i32"}, dict(BLOCKSIZE=64, BYTES=nt.BYTES)),
    ]


def main(archs: list[int]) -> None:
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dt, prec in (("fp32", "ieee"), ("bf16", None), ("fp16", None)):
            for name, fn, sig, consts, *options in signatures(f"*{dt}", prec, upcast=False):
                options = options[0] if options else {}
                sig = {**sig, **{k: "constexpr" for k in consts}}
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                          options=options)
                assert compiled.asm.get("ptx"), name
                shared = compiled.metadata.shared
                assert shared <= SHARED_LIMIT[arch], f"{name} {dt} sm_{arch}: {shared} bytes of shared memory"
                print(f"compiled {name} {dt} sm_{arch} shared={shared}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
