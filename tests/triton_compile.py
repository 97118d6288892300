"""Compile every Triton kernel of kernels/ for CUDA targets with no GPU: python triton_compile.py 80 90."""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def signatures(p: str, prec):
    from quiver.kernels import attention_triton as at
    from quiver.kernels import lora_triton as lt

    seg = {"seg_index_ptr": "*i64", "seg_starts_ptr": "*i64", "seg_lens_ptr": "*i64", "seg_slots_ptr": "*i64"}
    tiles = {"tile_slice_ptr": "*i32", "tile_n0_ptr": "*i32", "slice_end_ptr": "*i32"}
    return [
        (lt._shrink_sgmv, {"x_ptr": p, "a_ptr": p, "out_ptr": p, **seg, "K": "i32", "N": "i32", "stride_xt": "i32",
                           "stride_al": "i32", "stride_an": "i32", "stride_ot": "i32"},
         dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, PRECISION=prec)),
        (lt._expand_sgmv, {"xa_ptr": p, "b_ptr": p, "y_ptr": p, **seg, **tiles, "R": "i32", "stride_xat": "i32",
                           "stride_bl": "i32", "stride_br": "i32", "stride_yt": "i32"},
         dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, PRECISION=prec)),
        (lt._shrink_bgmv, {"x_ptr": p, "a_ptr": p, "out_ptr": p, "slots_ptr": "*i64", "K": "i32", "N": "i32",
                           "stride_xt": "i32", "stride_al": "i32", "stride_an": "i32", "stride_ot": "i32"},
         dict(BLOCK_N=64, BLOCK_K=32)),
        (lt._expand_bgmv, {"xa_ptr": p, "b_ptr": p, "y_ptr": p, "slots_ptr": "*i64", **tiles, "R": "i32",
                           "stride_xat": "i32", "stride_bl": "i32", "stride_br": "i32", "stride_yt": "i32"},
         dict(BLOCK_N=64, BLOCK_R=16)),
        (at._prefix_paged_attention, {
            "q_ptr": p, "k_ptr": p, "v_ptr": p, "out_ptr": p, "tables_ptr": "*i64", "q_start_ptr": "*i64",
            "q_lens_ptr": "*i64", "kv_off_ptr": "*i64", "prefix_ptr": "*i64", "scale": "fp32", "GROUP": "i32",
            "BLOCK_SIZE": "i32", "D": "i32", **{k: "i32" for k in (
                "stride_qb", "stride_qq", "stride_qh", "stride_kh", "stride_kb", "stride_ks", "stride_tb",
                "stride_ob", "stride_oq", "stride_oh")}},
         dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=64, PRECISION=prec)),
    ]


def main(archs: list[int]) -> None:
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dt, prec in (("fp32", "ieee"), ("bf16", None)):
            for fn, sig, consts in signatures(f"*{dt}", prec):
                sig = {**sig, **{k: "constexpr" for k in consts}}
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
                assert compiled.asm.get("ptx"), fn.__name__
                print(f"compiled {fn.__name__} {dt} sm_{arch}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
