"""GPTConfig: presets (SPEC section 3), derived figures, and refusal of broken configs."""

from __future__ import annotations

import pytest
import torch

from model import GPTConfig, RecursiveGPT

# preset -> (params of the SPEC table, effective depth, gradient depth)
SPEC_TABLE = {
    "tiny": (0.4e6, 48, 24),
    "A": (75e6, 768, 384),
    "B": (176e6, 1280, 640),
    "C": (220e6, 2400, 1200),
    "D": (595e6, 2880, 1440),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_preset_figures_match_spec(name: str) -> None:
    params, eff, grad = SPEC_TABLE[name]
    cfg = GPTConfig.preset(name)
    assert cfg.num_params(non_embedding=True) == pytest.approx(params, rel=0.03)
    assert cfg.effective_depth == eff
    assert cfg.gradient_depth == grad


def test_preset_shapes() -> None:
    # B and C: 1024 is not divisible by the seeds' 12 heads, so 16 heads of 64.
    for name in ("B", "C"):
        cfg = GPTConfig.preset(name)
        assert (cfg.n_embd, cfg.n_head, cfg.head_dim) == (1024, 16, 64)
    assert GPTConfig.preset("D").sequence_len == 2048
    assert GPTConfig.preset("A").sequence_len == 1024
    assert GPTConfig.preset("tiny").sequence_len == 256
    assert GPTConfig.preset("tiny").vocab_size % 64 == 0
    assert GPTConfig.preset("A").vocab_size == 50304
    # SwiGLU hidden = 8/3 n_embd rounded up to a multiple of 64
    assert GPTConfig.preset("A").mlp_hidden == 2048
    assert GPTConfig.preset("B").mlp_hidden == 2752
    assert GPTConfig.preset("tiny").mlp_hidden == 384


def test_overrides_and_string_coercion() -> None:
    cfg = GPTConfig.preset("A", n_loops=4, N_sup="2", halting="true", norm_style="pre")
    assert (cfg.n_loops, cfg.N_sup, cfg.halting, cfg.norm_style) == (4, 2, True, "pre")
    assert cfg.effective_depth == 12 * 5 * 2 * 2
    assert cfg.gradient_depth == 12 * 5 * 2
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(n_loops=1).n_loops == 1


def non_embedding_params(model: RecursiveGPT) -> int:
    skip = {id(model.tok_emb.weight), id(model.lm_head.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@pytest.mark.parametrize("overrides", [
    {},
    {"norm_style": "pre"},
    {"halting": True},
    {"state_init": "input"},
    {"n_kv_head": 4, "n_layer": 3, "norm_style": "pre", "halting": True, "state_init": "input"},
    {"recursion": False},
    {"exit_gate": True},
    {"depth_sampling": "poisson", "backprop_recursions": 2},
    {"qk_norm": True, "input_norm": True, "zero_init_out": True, "logit_softcap": 15.0},
])
def test_num_params_equals_built_model(tiny_config, overrides) -> None:
    cfg = tiny_config(**overrides)
    model = RecursiveGPT(cfg)
    assert cfg.num_params(non_embedding=True) == non_embedding_params(model)
    assert cfg.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())


def test_parameter_groups_cover_every_parameter_once(tiny_config) -> None:
    model = RecursiveGPT(tiny_config(halting=True, norm_style="pre"))
    groups = model.parameter_groups()
    names = [n for group in groups.values() for n, _ in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert [n for n, _ in groups["embedding"]] == ["tok_emb.weight"]
    assert [n for n, _ in groups["lm_head"]] == ["lm_head.weight"]
    matrices = {n for n, p in model.named_parameters() if n.startswith("stack.") and p.ndim == 2}
    assert {n for n, _ in groups["matrix"]} == matrices
    # norms, initial states and the halting head (its (1, n_embd) weight included)
    assert all(p.ndim == 1 or n.startswith("halt_head.") for n, p in groups["scalar"])
    assert "halt_head.bias" in {n for n, _ in groups["scalar"]}
    assert not any(n.startswith("init_state") for n, _ in model.named_parameters())


@pytest.mark.parametrize(("overrides", "names"), [
    ({"n_embd": 130}, ["n_embd", "n_head"]),                  # 130 % 4
    ({"n_embd": 1024, "n_head": 12}, ["n_embd", "n_head"]),   # the seeds' B/C heads
    ({"n_kv_head": 3}, ["n_head", "n_kv_head"]),
    ({"n_loops": 0}, ["n_loops"]),
    ({"T_recursion": 0}, ["T_recursion"]),
    ({"N_sup": 0}, ["N_sup"]),
    ({"N_sup_inference": 0}, ["N_sup_inference"]),
    ({"n_layer": 0}, ["n_layer"]),
    ({"n_loops": 2.5}, ["n_loops"]),
    ({"n_loops": "many"}, ["n_loops"]),
    ({"halting": "maybe"}, ["halting"]),
    ({"improvement_reward_scale": -0.1}, ["improvement_reward_scale"]),
    ({"halt_loss_weight": -1.0}, ["halt_loss_weight"]),
    ({"supervision_weight_base": 0.0}, ["supervision_weight_base"]),
    ({"halt_threshold": 1.5}, ["halt_threshold"]),
    ({"norm_style": "sandwich"}, ["norm_style"]),
    ({"state_init": "zeros"}, ["state_init"]),
    ({"n_layers": 4}, ["n_layers"]),                          # unknown key
    ({"depth_sampling": "uniform"}, ["depth_sampling"]),
    ({"depth_sampling": "poisson", "T_recursion": 1}, ["depth_sampling", "T_recursion"]),
    ({"backprop_recursions": 3}, ["backprop_recursions", "T_recursion"]),  # tiny: T 2
    ({"backprop_recursions": 0}, ["backprop_recursions"]),
    ({"exit_gate": True, "N_sup": 1}, ["exit_gate", "N_sup"]),
    ({"exit_entropy_beta": -0.1}, ["exit_entropy_beta"]),
])
def test_invalid_config_is_refused_naming_the_key(overrides, names) -> None:
    with pytest.raises(ValueError) as err:
        GPTConfig.preset("tiny", **overrides)
    for name in names:
        assert name in str(err.value)


def test_constructor_validates_too() -> None:
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=12, n_kv_head=5)


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="'E'") as err:
        GPTConfig.preset("E")
    assert "tiny" in str(err.value)  # the message lists the choices


def test_summary_reports_derived_figures() -> None:
    cfg = GPTConfig.preset("B")
    s = cfg.summary()
    assert s["effective_depth"] == 1280 and s["gradient_depth"] == 640
    assert s["params_total"] == s["params_non_embedding"] + 2 * 50304 * 1024
    # graded recursion forward + backward (3x), the no-grad one forward only (1x): with T 2
    # and N_sup = N_sup_inference, training costs between 2x and 3x inference per token
    assert 2 < s["flops_per_token_train"] / s["flops_per_token_inference"] < 3


def test_plain_gpt_flops_follow_the_6n_rule() -> None:
    """With the recursion off, B is a plain GPT: training FLOPs per token are the textbook
    6·N (non-embedding matmul params) + 6·n_embd·vocab (lm_head) + 12·n_layer·seq·n_embd
    (attention scores and values, forward + backward); the norm weights (not matmuls) are the
    only difference, well under 0.1%."""
    cfg = GPTConfig.preset("B", recursion=False)
    e, n_layer, seq, vocab = cfg.n_embd, cfg.n_layer, cfg.sequence_len, cfg.vocab_size
    textbook = 6 * cfg.num_params(non_embedding=True) + 6 * e * vocab + 12 * n_layer * seq * e
    assert cfg.summary()["flops_per_token_train"] == pytest.approx(textbook, rel=1e-3)


def test_model_builds_without_touching_config(tiny_config) -> None:
    cfg = tiny_config()
    before = cfg.to_dict()
    model = RecursiveGPT(cfg)
    assert model.config.to_dict() == before
    assert model.rope_cos.shape == (cfg.sequence_len, cfg.head_dim // 2)
    assert model.rope_cos.dtype == torch.float32
