"""launch.convert: HF DeepSeek-V3 folders ↔ our model (names, FP8 blocks, logits vs transformers)."""
import json
import os

import pytest
import torch

from launch.convert import (
    ConvertError, MissingTensorError, UnknownTensorError, dequantize_fp8, from_hf, main, to_hf,
)
from model import DeepSeekV3, ModelConfig
from tests.helpers import tiny_model_cfg as tiny_cfg

torch.set_num_threads(1)




def ours_random(cfg: ModelConfig, seed: int = 0) -> DeepSeekV3:
    """Our model with seeded weights, non-trivial norms and a small positive router bias."""
    model = DeepSeekV3(cfg)
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "norm" in name:
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("gate.bias"):
                t.copy_(0.05 * torch.rand(t.shape, generator=g))
    return model.eval()


# ------------------------------------------------------------------------------------------
# transformers → ours
# ------------------------------------------------------------------------------------------
def hf_model(q_lora_rank=32, yarn=False, seed=0, signed_bias=False):
    transformers = pytest.importorskip("transformers")
    kw = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        q_lora_rank=q_lora_rank or None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=64, num_nextn_predict_layers=1, initializer_range=0.02,
    )
    if yarn:  # context extension 16 → 64: YaRN frequencies and the mscale² softmax factor
        kw["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    config = transformers.DeepseekV3Config(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                # small positive by default (older transformers masked dropped groups with 0.0, not -inf,
                # which agrees only while s+b > 0); transformers 5.x masks with -inf like the reference
                t.copy_(0.05 * torch.rand(t.shape, generator=g) - (0.6 if signed_bias else 0.0))  # s+b < 0
            elif "norm" in name:
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
    return model


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "yarn", "negative_bias"])
def test_from_hf_logits_match_transformers(tmp_path, variant):
    if variant == "negative_bias":
        import inspect

        import transformers.models.deepseek_v3.modeling_deepseek_v3 as hf_mod
        if 'float("-inf")' not in inspect.getsource(hf_mod.DeepseekV3TopkRouter.forward):
            pytest.skip("this transformers masks dropped groups with 0.0 (differs from DeepSeek for s+b < 0)")
    hf = hf_model(q_lora_rank=0 if variant == "no_q_lora" else 32, yarn=variant == "yarn",
                  signed_bias=variant == "negative_bias")
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP layer"):  # transformers saves no MTP weights
        cfg, sd = from_hf(tmp_path)
    assert cfg.mtp_depth == 0 and cfg.q_lora_rank == (0 if variant == "no_q_lora" else 32)
    assert cfg.yarn_enabled == (variant == "yarn")
    assert sd["layers.1.ffn.gate.bias"].abs().sum() > 0
    ours = DeepSeekV3(cfg)
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape == (2, 48, cfg.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# ours → HF → ours / transformers
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shard", [False, True])
def test_round_trip_identical(tmp_path, shard):
    cfg = tiny_cfg(rope_factor=40.0, balance_alpha=3e-4, max_nodes_per_token=2)  # yarn inactive: kept in extras
    model = ours_random(cfg)
    sd = model.state_dict()
    files = to_hf(cfg, sd, tmp_path, max_shard_bytes=200_000 if shard else 5 * 10**9)
    assert (len(files) > 1) == shard
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["model_type"] == "deepseek_v3" and hf_cfg["num_nextn_predict_layers"] == 1
    assert hf_cfg["rope_scaling"] is None  # YaRN off when max_seq_len == original_seq_len
    cfg2, sd2 = from_hf(tmp_path)
    assert cfg2 == cfg
    assert sd2.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(sd2[k], v), k


def test_released_names_and_mtp_layout(tmp_path):
    from safetensors import safe_open

    cfg = tiny_cfg()
    to_hf(cfg, ours_random(cfg).state_dict(), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    for k in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
              "model.layers.2.self_attn.kv_a_proj_with_mqa.weight", "model.layers.3.eh_proj.weight",
              "model.layers.3.enorm.weight", "model.layers.3.hnorm.weight", "model.layers.3.shared_head.norm.weight",
              "model.layers.3.shared_head.head.weight", "model.layers.3.embed_tokens.weight",
              "model.layers.3.mlp.experts.0.gate_proj.weight", "model.layers.3.self_attn.q_b_proj.weight"]:
        assert k in keys, k


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_to_hf_loads_in_transformers_same_logits(tmp_path, q_lora_rank):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(q_lora_rank=q_lora_rank)
    model = ours_random(cfg, seed=5)
    to_hf(cfg, model.state_dict(), tmp_path, max_shard_bytes=300_000)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    # transformers' weights are ours (the MTP layer model.layers.3.* is reported UNEXPECTED and dropped)
    hsd = hf.state_dict()
    assert torch.equal(hsd["model.layers.2.mlp.gate.e_score_correction_bias"], model.state_dict()["layers.2.ffn.gate.bias"])
    assert torch.equal(hsd["model.layers.1.mlp.experts.down_proj"], model.state_dict()["layers.1.ffn.experts.w2"])


def test_to_hf_without_mtp(tmp_path):
    cfg = tiny_cfg()
    model = ours_random(cfg)
    to_hf(cfg, model.state_dict(), tmp_path, include_mtp=False)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 0
    cfg2, sd2 = from_hf(tmp_path)
    assert cfg2.mtp_depth == 0 and cfg.mtp_depth == 1
    ref = model.state_dict()
    assert sd2.keys() == {k for k in ref if not k.startswith("mtp.")}
    DeepSeekV3(cfg2).load_state_dict(sd2, strict=True)


# ------------------------------------------------------------------------------------------
# FP8 blocks
# ------------------------------------------------------------------------------------------
def test_dequantize_fp8_blocks_with_edges():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(200, 300, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=g) + 0.01
    got = dequantize_fp8(w, s)
    want = torch.empty(200, 300)
    for i in range(200):
        for j in range(0, 300, 64):  # 64 divides the block: each chunk lies in one block
            want[i, j:j + 64] = w[i, j:j + 64].float() * s[i // 128, j // 128]
    assert torch.equal(got, want)
    assert dequantize_fp8(w, s, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ConvertError, match="does not tile"):
        dequantize_fp8(w, torch.ones(1, 3))
    s2 = torch.rand(4, 3, generator=g)  # non-square blocks (quantization_config.weight_block_size)
    got2 = dequantize_fp8(w, s2, block=(64, 128))
    assert torch.equal(got2[70, 260], w[70, 260].float() * s2[1, 2])
    assert torch.equal(got2[199, 0], w[199, 0].float() * s2[3, 0])


def _quantise(w: torch.Tensor, block: int = 128):
    """Reference per-block E4M3 quantisation: (w_fp8, scale_inv [⌈M/b⌉, ⌈N/b⌉])."""
    m, n = w.shape
    sm, sn = -(-m // block), -(-n // block)
    scale = torch.empty(sm, sn)
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    for i in range(sm):
        for j in range(sn):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().amax().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_from_hf_fp8_checkpoint(tmp_path):
    """A release-style FP8 folder: fp8 projections + weight_scale_inv, scales in another shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    # dims not multiples of 128 so the blocks have ragged edges
    cfg = tiny_cfg(dim=192, inter_dim=320, moe_inter_dim=160, q_lora_rank=144, kv_lora_rank=136, mtp_depth=1)
    model = ours_random(cfg)
    src = tmp_path / "bf"
    to_hf(cfg, model.state_dict(), src)
    dst = tmp_path / "fp8"
    dst.mkdir()
    weights, scales, expect = {}, {}, {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            quantise = k.endswith("proj.weight") and "gate.weight" not in k
            if quantise:
                q, s = _quantise(t)
                weights[k], scales[k + "_scale_inv"] = q, s
                expect[k] = dequantize_fp8(q, s)
            else:
                weights[k] = t.to(torch.bfloat16)
                expect[k] = weights[k].float()
    assert scales["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)  # [320, 192]: ragged edges
    save_file(weights, str(dst / "model-00001-of-00002.safetensors"))
    save_file(scales, str(dst / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in weights}
    wm.update({k: "model-00002-of-00002.safetensors" for k in scales})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    hf_cfg = json.loads((src / "config.json").read_text())
    hf_cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}  # as in the release
    (dst / "config.json").write_text(json.dumps(hf_cfg))

    cfg2, sd = from_hf(dst)
    assert cfg2 == cfg
    ref = dict(model.state_dict())
    # per-expert FP8 tensors stack into our [E, out, in]
    assert torch.equal(sd["layers.1.ffn.experts.w3"][5], expect["model.layers.1.mlp.experts.5.up_proj.weight"])
    assert torch.equal(sd["mtp.0.block.attn.wkv_b.weight"], expect["model.layers.3.self_attn.kv_b_proj.weight"])
    assert torch.equal(sd["layers.0.ffn.w2.weight"], expect["model.layers.0.mlp.down_proj.weight"])
    for k, v in sd.items():  # E4M3 keeps ~3 mantissa bits: within 1/16 of the block's scale
        assert v.dtype == torch.float32 and v.shape == ref[k].shape, k
        assert (v - ref[k]).abs().max() <= ref[k].abs().max() / 8 + 1e-6, k
    # loads strictly into the model
    DeepSeekV3(cfg2).load_state_dict(sd, strict=True)
    # bf16 request
    _, sd16 = from_hf(dst, dtype=torch.bfloat16)
    assert sd16["layers.1.ffn.experts.w1"].dtype == torch.bfloat16

    # an fp8 tensor whose scale is missing is refused
    os.remove(dst / "model.safetensors.index.json")
    os.remove(dst / "model-00002-of-00002.safetensors")
    with pytest.raises(ConvertError, match="scale_inv"):
        from_hf(dst)


# ------------------------------------------------------------------------------------------
# errors and CLI
# ------------------------------------------------------------------------------------------
def test_unknown_and_missing_names(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_cfg(mtp_depth=0)
    to_hf(cfg, ours_random(cfg).state_dict(), tmp_path)
    f = str(tmp_path / "model.safetensors")
    sd = load_file(f)
    save_file({**sd, "model.layers.0.self_attn.foo.weight": torch.zeros(2),
               "model.layers.7.mlp.gate.weight": torch.zeros(2)}, f)
    with pytest.raises(UnknownTensorError, match="self_attn.foo.weight"):
        from_hf(tmp_path)
    # a tensor of the wrong q layout (q_proj when q_lora_rank > 0) is unknown for this config
    save_file({**sd, "model.layers.0.self_attn.q_proj.weight": torch.zeros(2)}, f)
    with pytest.raises(UnknownTensorError, match="q_proj"):
        from_hf(tmp_path)
    del sd["model.layers.2.mlp.experts.3.up_proj.weight"], sd["model.norm.weight"]
    save_file(sd, f)
    with pytest.raises(MissingTensorError, match=r"layers.2.ffn.experts.w3\[3\]|norm.weight"):
        from_hf(tmp_path)
    with pytest.raises(UnknownTensorError, match="to_hf"):
        to_hf(cfg, {**ours_random(cfg).state_dict(), "layers.0.attn.extra": torch.zeros(1)}, tmp_path / "x")


@pytest.mark.parametrize("key,value,match", [
    ("norm_topk_prob", False, "norm_topk_prob"),
    ("rope_interleave", False, "rope_interleave"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                      "mscale": 1.0, "mscale_all_dim": 0.707}, "mscale"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope type"),
])
def test_config_refused(tmp_path, key, value, match):
    cfg = tiny_cfg(mtp_depth=0)
    to_hf(cfg, ours_random(cfg).state_dict(), tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c[key] = value
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConvertError, match=match):
        from_hf(tmp_path)


def test_cli_import_export(tmp_path):
    cfg = tiny_cfg()
    model = ours_random(cfg)
    to_hf(cfg, model.state_dict(), tmp_path / "hf")
    main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")])
    assert (tmp_path / "ours" / "model.yaml").exists()
    main(["export", str(tmp_path / "ours"), str(tmp_path / "hf2")])
    cfg2, sd2 = from_hf(tmp_path / "hf2")
    assert cfg2 == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(sd2[k], v), k
