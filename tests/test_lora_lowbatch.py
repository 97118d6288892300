"""LoRA at low batch (kernels.ops.TorchOps): steps of at most FEW_ROWS tokens take one op per projection on the
CPU (kernels.cpu_kernels lora_add_: float32 maths over the slot buffers, rounded once into y), or without it one
matmul pair over all their tokens when they use one adapter (base rows' shrink zeroed). Against a float64
oracle, against the general path (FEW_ROWS = 0), and across slot changes."""
from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model
from peft import LoraConfig
from peft_fixtures import make_adapter

from quiver.kernels import cpu_kernels, torch_meta
from quiver.kernels.ops import TorchOps
from quiver.kernels.torch_meta import FEW_ROWS, torch_adapter_meta
from quiver.server.engine.config import EngineConfig
from quiver.server.engine.llm_engine import LLMEngine
from quiver.server.engine.sampling import SamplingParams

SLICES = [40, 16, 16]  # a fused q/k/v: three slices of one projection


def slots_with(dtype, num_slots=3, rank=4, k=24, seed=0):
    """TorchOps slots holding a random adapter in every slot, and its (A, B^T) per slot and slice."""
    g = torch.Generator().manual_seed(seed)
    buf = TorchOps.lora_buffers(num_slots, rank, k, SLICES, dtype, "cpu")
    written = {}
    for slot in range(num_slots):
        written[slot] = write(buf, slot, rank - slot % 2, k, g, dtype)  # ranks below R too
    return buf, written


def write(buf, slot, r, k, g, dtype):
    parts = [(torch.randn(r, k, generator=g).to(dtype), torch.randn(r, w, generator=g).to(dtype)) for w in SLICES]
    for s, (a, b_t) in enumerate(parts):
        TorchOps.lora_write(buf, slot, s, a, b_t)
    return parts


def exact_delta(x, parts_of, token_slots):
    """float64 y delta: token t of slot s >= 0 gets B_s (A_s x[t]) for each slice."""
    out = torch.zeros(x.shape[0], sum(SLICES), dtype=torch.float64)
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            out[t] = torch.cat([(x[t].double() @ a.double().T) @ b_t.double() for a, b_t in parts_of[slot]])
    return out


CASES = [[0], [2, 2, 2], [-1, 1], [1, -1, -1, 1, -1], [-1] * 7 + [0]]


@pytest.mark.parametrize("token_slots", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_of_one_adapter_add_its_delta_and_nothing_to_base_rows(token_slots, dtype):
    buf, parts_of = slots_with(dtype)
    slots = torch.tensor(token_slots)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(token_slots), 24, generator=g).to(dtype)
    y = torch.randn(len(token_slots), sum(SLICES), generator=g).to(dtype)
    meta = torch_adapter_meta(slots)
    assert meta.single_slot is not None and (meta.base_rows is not None) == bool((slots < 0).any())
    got = y.clone()
    TorchOps.lora_apply(x, got, buf, meta)
    want = y.double() + exact_delta(x, parts_of, slots)
    base = slots < 0
    assert torch.equal(got[base], y[base])  # base rows exactly untouched
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    elif cpu_kernels.available():  # float32 maths, rounded once into y: the nearest bfloat16 or its neighbour
        ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-3)
        assert ((got.double() - want).abs() <= ulp).all()
    else:  # bfloat16 matmuls: x A^T rounded to bfloat16 on the way
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_a_rewritten_or_cleared_slot_serves_its_new_contents_at_once():
    buf, parts_of = slots_with(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 24, generator=g).to(torch.bfloat16)

    def delta(slot):
        y = torch.zeros(2, sum(SLICES), dtype=torch.bfloat16)
        TorchOps.lora_apply(x, y, buf, torch_adapter_meta(torch.tensor([slot, slot])))
        return y

    first = delta(1)
    parts_of[1] = write(buf, 1, 4, 24, g, torch.bfloat16)  # another adapter in slot 1
    again = delta(1)
    want = exact_delta(x, parts_of, torch.tensor([1, 1]))
    assert not torch.equal(first, again)
    tolerance = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-3) * (1 if cpu_kernels.available() else 8)
    assert ((again.double() - want).abs() <= tolerance).all()
    TorchOps.lora_clear(buf, 1)
    assert not delta(1).any()  # a cleared slot adds nothing


def test_bfloat16_slots_keep_b_in_64_column_blocks_too(monkeypatch):
    """LoraBuffers.b_blocks, what the one-call decode loop expands from: b itself, block by block, through
    writes and clears. Kept only where the kernels serve bfloat16 (AVX512-BF16): taken as so on any CPU here,
    since the blocking is torch's."""
    monkeypatch.setattr(cpu_kernels, "fast", lambda: True)
    buf, _ = slots_with(torch.bfloat16)
    assert slots_with(torch.float32)[0].b_blocks is None

    def unblocked():  # [S, NB, R, 64] -> [S, R, NB * 64], cut to b's width
        s, nb, r, block = buf.b_blocks.shape
        return buf.b_blocks.permute(0, 2, 1, 3).reshape(s, r, nb * block)[:, :, :buf.b.shape[2]]

    assert buf.b.any() and torch.equal(unblocked(), buf.b)
    TorchOps.lora_clear(buf, 1)
    assert not buf.b_blocks[1].any() and torch.equal(unblocked(), buf.b)


@pytest.mark.parametrize("token_slots", [[2], [-1, 0, 0], [1, -1, 2, 1]])
def test_few_token_steps_carry_their_slots_and_group_on_demand(token_slots):
    """Where the kernels serve, TorchOps.lora_meta gives a step of at most FEW_ROWS tokens only its slots
    (FewTokenMeta); any grouped field asked for is torch_adapter_meta's, and the delta is the same bits (without
    the kernels lora_apply asks for the grouped fields, and gets them)."""
    slots = torch.tensor(token_slots)
    meta, full = torch_meta.FewTokenMeta(slots), torch_adapter_meta(slots)
    served = cpu_kernels.available()
    assert isinstance(TorchOps.lora_meta(slots), torch_meta.FewTokenMeta if served else torch_meta.TorchAdapterMeta)
    assert "segments" not in vars(meta)
    buf, _ = slots_with(torch.bfloat16)
    x = torch.randn(len(token_slots), 24).to(torch.bfloat16)
    y = torch.randn(len(token_slots), sum(SLICES)).to(torch.bfloat16)
    got, want = y.clone(), y.clone()
    TorchOps.lora_apply(x, got, buf, meta)
    TorchOps.lora_apply(x, want, buf, full)
    assert torch.equal(got, want) and ("segments" in vars(meta)) != served  # with the kernels the slots were enough
    assert meta.segments == full.segments and meta.single_slot == full.single_slot
    assert torch.equal(meta.seg_index, full.seg_index)
    with pytest.raises(AttributeError):
        meta.no_such_field
    assert isinstance(TorchOps.lora_meta(torch.zeros(FEW_ROWS + 1, dtype=torch.long)), torch_meta.TorchAdapterMeta)


def test_larger_steps_and_several_adapters_keep_the_general_forms():
    assert torch_adapter_meta(torch.tensor([-1] * FEW_ROWS + [0])).single_slot is None  # a prefill with base rows
    assert torch_adapter_meta(torch.tensor([0] * 40)).single_slot == 0  # every token one adapter: any size
    assert torch_adapter_meta(torch.tensor([0, 1])).single_slot is None


# ---- through the engine ----------------------------------------------------------------------------------

ROWS = [["a"], ["a", "a", "a"], ["a", None], [None, "dora", None], ["a", "b"], ["dora", "b", None]]


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    """A tiny Llama and a Phi-3 (fused qkv_proj / gate_up_proj), each with a LoRA on every projection, another
    on a few, and a DoRA."""
    root = tmp_path_factory.mktemp("lowbatch")
    out = {}
    for arch, every in (("llama_gqa", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                        ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])):
        hf = make_tiny_model(root / arch, arch, intermediate_size=128)
        paths = {}
        for i, (name, cfg) in enumerate({
                "a": LoraConfig(r=8, lora_alpha=16, target_modules=every),
                "b": LoraConfig(r=4, lora_alpha=8, target_modules=[every[0], every[-1]]),
                "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=[every[0], every[-2]])}.items()):
            make_adapter(hf, root / f"{arch}-{name}", cfg, seed=700 + i, scale=0.3)
            paths[name] = root / f"{arch}-{name}"
        out[arch] = (root / arch, paths)
    return out


def engine_on(model_dir, tokenizer, dtype, **kw) -> LLMEngine:
    config = dict(max_loras=3, enable_prefix_caching=False) | kw  # every run computes its prompts afresh
    return LLMEngine(EngineConfig(dtype=dtype, model=str(model_dir), num_kv_blocks=128, block_size=4,
                                  max_model_len=128, max_lora_rank=8, **config), tokenizer=tokenizer)


def logits_of(engine, rows, new_tokens=3) -> list[list[torch.Tensor]]:
    """Each row's logits at every step (prefill, then decode steps of len(rows) tokens)."""
    seen = []
    engine.observers.append(lambda step, logits: seen.append(
        {seq.request_id: logits[pos].clone() for seq, pos in zip(step.sampled, step.sample_index.tolist())}))
    g = torch.Generator().manual_seed(3)
    seqs = [engine.add_request(torch.randint(3, 500, (3 + i,), generator=g).tolist(),
                               SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True), adapter=a)
            for i, a in enumerate(rows)]
    while engine.has_work():
        engine.step()
    engine.observers.pop()
    return [[s[seq.request_id] for s in seen] for seq in seqs]


def general_path(monkeypatch):
    """FEW_ROWS = 0: every step takes the forms the general path chose before the low-batch one."""
    monkeypatch.setattr(torch_meta, "FEW_ROWS", 0)


@pytest.mark.parametrize("arch,quantization", [("llama_gqa", None), ("llama_gqa", "nf4"), ("phi3", None)])
def test_low_batch_steps_equal_the_general_path(model_set, plain_tokenizer, arch, quantization, monkeypatch):
    """float32: the same maths in another grouping and summation order, within 3e-5; bfloat16: base rows bit
    for bit (they get y + 0), adapter rows as close to the float32 model as the general path.
    Phi-3's fused slices on full-precision weights; the 4-bit base on Llama."""
    model_dir, paths = model_set[arch]
    for dtype in ("float32", "bfloat16"):
        engine = engine_on(model_dir, plain_tokenizer, dtype, quantization=quantization)
        for name, path in paths.items():
            engine.load_adapter(name, str(path))
        with monkeypatch.context() as m:
            general_path(m)
            before = {tuple(rows): logits_of(engine, rows) for rows in ROWS}
            reference = engine_on(model_dir, plain_tokenizer, "float32", quantization=quantization)
            for name, path in paths.items():
                reference.load_adapter(name, str(path))
            exact = {tuple(rows): logits_of(reference, rows) for rows in ROWS}
        errors = {"old": [], "new": []}  # bfloat16 adapter rows: each path's distance from the float32 model
        for rows in ROWS:
            after = logits_of(engine, rows)
            for name, old, new, ref in zip(rows, before[tuple(rows)], after, exact[tuple(rows)]):
                for o, n, r in zip(old, new, ref):
                    if dtype == "float32":
                        torch.testing.assert_close(n, o, atol=3e-5, rtol=1e-5)
                    elif name is None:
                        assert torch.equal(n, o), rows
                    else:
                        errors["old"].append((o - r).abs().max().item())
                        errors["new"].append((n - r).abs().max().item())
        if dtype == "bfloat16":  # rounding noise either way; a wrong or stale delta is off by the adapter's effect
            assert max(errors["new"]) <= 2 * max(errors["old"]), errors
            assert sum(errors["new"]) <= 1.5 * sum(errors["old"]), errors


def test_a_slot_reloaded_with_another_adapter_serves_the_new_one(model_set, plain_tokenizer):
    """One slot: after low-batch steps of one adapter, unloading it and loading another into the same slot
    must serve exactly what a fresh engine serves."""
    model_dir, paths = model_set["llama_gqa"]
    engine = engine_on(model_dir, plain_tokenizer, "bfloat16", max_loras=1)
    engine.load_adapter("a", str(paths["a"]))
    logits_of(engine, ["a"])
    engine.unload_adapter("a")
    engine.load_adapter("b", str(paths["b"]))
    got = logits_of(engine, ["b", None])
    fresh = engine_on(model_dir, plain_tokenizer, "bfloat16", max_loras=1)
    fresh.load_adapter("b", str(paths["b"]))
    want = logits_of(fresh, ["b", None])
    for g_row, w_row in zip(got, want):
        for g_, w_ in zip(g_row, w_row):
            assert torch.equal(g_, w_)
