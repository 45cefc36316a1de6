"""Agent attention: AgentSD's formulas and token merging against naive torch, the bipartite matching kernel
against its reference, stock equivalence, the step schedule, tiny UNet and DiT pipelines."""

import importlib

import pytest
import torch
from diffusers.models.attention_processor import Attention
from helpers import max_diff, record_calls, run_tiny, tiny_pipeline

import attnpack
from attnpack.context import AttnContext
from attnpack.kernels import best_match
from attnpack.methods import agent as agent_module
from attnpack.methods.agent import AgentAttention, PooledAgentAttention, agent_attention, plan_merge

bipartite = importlib.import_module("attnpack.kernels.bipartite_match")


def naive_softmax_attention(q, k, v, scale, mask=None):
    """(B, S, H, D) attention written out: softmax(q k^T scale) v, masked keys at -inf."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


# ---- formulas


@pytest.mark.parametrize("fp32", [False, True])
def test_agent_attention_formula_matches_naive(fp32):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 16) for _ in range(3))
    agents = torch.randn(2, 5, 3, 16)
    s = 16**-0.5
    agent_v = naive_softmax_attention(agents, k, v, s)
    expected = naive_softmax_attention(q, agents, agent_v, s**0.3) + 0.075 * v.double()
    out = agent_attention(q, agents, k, v, k_scale2=0.3, k_shortcut=0.075, fp32=fp32)
    assert max_diff(out, expected) < 1e-5


def test_agent_attention_key_mask_applies_to_the_first_stage():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 12, 2, 8) for _ in range(3))
    agents = torch.randn(1, 4, 2, 8)
    keep = torch.rand(1, 12) > 0.3
    mask = keep[:, None, None, :]
    agent_v = naive_softmax_attention(agents, k, v, 8**-0.5, mask)
    expected = naive_softmax_attention(q, agents, agent_v, 8**-0.15) + 0.1 * v.double()
    out = agent_attention(q, agents, k, v, k_scale2=0.3, k_shortcut=0.1, attn_mask=mask)
    assert max_diff(out, expected) < 1e-5


def test_fp32_keeps_half_inputs_finite_and_in_dtype():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 64, 2, 32) for _ in range(3))
    agents = torch.randn(1, 8, 2, 32)
    out = agent_attention(q.half(), agents.half(), k.half(), v.half(), fp32=True)
    assert out.dtype == torch.float16
    assert max_diff(out, agent_attention(q, agents, k, v)) < 2e-3


# ---- token merging


def naive_merge_groups(metric, grid, sx, sy, merged, dst_cells):
    """Per batch element, a dict dst position -> member positions, built from the definition: cosine
    similarity, sources ranked by their best similarity, the top `merged` joining their best destination."""
    height, width = grid
    dst = sorted(dst_cells)
    src = [p for p in range(height * width) if p not in dst_cells]
    groups = []
    for b in range(metric.shape[0]):
        unit = torch.nn.functional.normalize(metric[b].double(), dim=-1)
        sims = unit[src] @ unit[dst].T
        best, target = sims.max(dim=-1)
        ranked = sorted(range(len(src)), key=lambda i: -best[i].item())
        members = {d: [d] for d in dst}
        for i in ranked[:merged]:
            members[dst[target[i]]].append(src[i])
        groups.append(members)
    return groups


def test_merge_and_unmerge_match_the_definition():
    torch.manual_seed(3)
    grid, sx, sy = (6, 9), 3, 2  # the grid is tiled by whole cells
    metric = torch.randn(2, 54, 8)
    plan = plan_merge(metric, grid, sx=sx, sy=sy, ratio=0.5, agent_ratio=0.0)
    dst_cells = {int(p) for p in plan.dst_positions}
    assert len(dst_cells) == (6 // sy) * (9 // sx)
    for p in dst_cells:  # top-left of its cell without a generator
        assert (p // 9) % sy == 0 and (p % 9) % sx == 0
    assert plan.merged == 27 and plan.agent_merged is None  # 54 agents would not save work

    x = torch.randn(2, 54, 5)
    merged = plan.tokens(x)
    assert merged.shape == (2, 54 - 27, 5)
    restored = plan.unmerge(merged)
    for b, members in enumerate(naive_merge_groups(metric, grid, sx, sy, 27, dst_cells)):
        covered = set()
        for positions in members.values():
            mean = x[b, positions].mean(0)
            for p in positions:
                assert torch.allclose(restored[b, p], mean, atol=1e-6)
            covered.update(positions)
        for p in set(range(54)) - covered:  # unmerged tokens come back as they were
            assert torch.equal(restored[b, p], x[b, p])


def test_agents_only_where_they_save_work():
    metric = torch.randn(1, 64 * 64, 4)
    stage1 = plan_merge(metric, (64, 64), sx=4, sy=4, ratio=0.4, agent_ratio=0.95)
    # agent_ratio 0.95 asks for more than the sources: every source merges, one agent per 4 x 4 cell
    assert stage1.agent_merged == 64 * 64 - 256 and stage1.agents(torch.randn(1, 4096, 3)).shape[1] == 256
    stage2 = plan_merge(metric, (64, 64), sx=2, sy=2, ratio=0.4, agent_ratio=0.5)
    assert stage2.agent_merged is None  # 2 x 2048 agents >= 2458 merged tokens: plain ToMe
    assert plan_merge(metric, (64, 64), sx=4, sy=4, ratio=0.0, agent_ratio=0.95) is None


def test_random_destinations_follow_the_generator():
    metric = torch.randn(1, 16 * 16, 4)

    def destinations(seed):
        plan = plan_merge(
            metric,
            (16, 16),
            sx=4,
            sy=4,
            ratio=0.4,
            agent_ratio=0.95,
            generator=torch.Generator().manual_seed(seed),
        )
        return plan.dst_positions.tolist()

    assert destinations(0) == destinations(0)
    assert destinations(0) != destinations(1)
    cells = {((p // 16) // 4, (p % 16) // 4) for p in destinations(0)}
    assert len(cells) == 16  # still one per cell


# ---- the bipartite matching kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5, 3, 8), (2, 150, 70, 40), (1, 64, 129, 96)])
def test_best_match_triton_matches_reference(dtype, shape):
    batch, num_src, num_dst, channels = shape
    torch.manual_seed(4)
    src = torch.nn.functional.normalize(torch.randn(batch, num_src, channels), dim=-1).to(dtype)
    dst = torch.nn.functional.normalize(torch.randn(batch, num_dst, channels), dim=-1).to(dtype)
    value, index = best_match(src, dst, backend="triton")
    ref_value, ref_index = best_match(src, dst, backend="reference")
    assert value.dtype == torch.float32 and index.dtype == torch.int64
    assert max_diff(value, ref_value) < 1e-5
    # accumulation order may flip near-ties: any index must score as well as the reference's
    picked = (src.float() @ dst.float().transpose(1, 2)).gather(2, index[..., None]).squeeze(2)
    assert max_diff(picked, ref_value) < 1e-5
    assert (index == ref_index).float().mean() > 0.98


def test_best_match_takes_the_first_of_equal_scores():
    src = torch.ones(1, 3, 4)
    dst = torch.ones(1, 70, 4)  # every score ties, across two destination tiles
    for backend in ("triton", "reference"):
        assert best_match(src, dst, backend=backend)[1].tolist() == [[0, 0, 0]]


def test_best_match_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal B and C"):
        best_match(torch.randn(1, 4, 8), torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="backend='cuda'"):
        bipartite.best_match(torch.randn(1, 4, 8), torch.randn(1, 4, 8), backend="cuda")


# ---- one layer against AgentSD written out


def make_site_layer(method, grid, batch=2):
    """A UNet self-attention module wired to a context the way attach does it, for one direct call."""
    from attnpack.context import AttentionSite
    from attnpack.families import unet

    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    ctx = AttnContext()
    ctx.grid, ctx.batch_size = grid, batch
    site = AttentionSite(
        name="down_blocks.0.attentions.0.transformer_blocks.0.attn1",
        local_name="attn1",
        denoiser="unet",
        family=unet.FAMILY,
        adapter=unet.ATTENTION,
        role=attnpack.Role.SELF,
        index=0,
        role_index=0,
        context=ctx,
        stock_processor=attn.processor,
    )
    setattr(attn, attnpack.context.SITE_ATTR, site)
    attn.set_processor(method)
    return attn, ctx


def test_one_layer_equals_agentsd_by_hand():
    torch.manual_seed(5)
    method = AgentAttention(late_start=1.0, use_rand=False)
    attn, _ = make_site_layer(method, (16, 16))
    x = torch.randn(2, 256, 32)
    with torch.no_grad():
        out = attn(x)
        plan = plan_merge(x, (16, 16), sx=4, sy=4, ratio=0.4, agent_ratio=0.95)
        tokens, agents = plan.tokens(x), plan.agents(x)
        split = lambda t: t.unflatten(-1, (4, 8))  # noqa: E731
        q, k, v, a = (
            split(attn.to_q(tokens)),
            split(attn.to_k(tokens)),
            split(attn.to_v(tokens)),
            split(attn.to_q(agents)),
        )
        agent_v = naive_softmax_attention(a, k, v, 8**-0.5)
        y = naive_softmax_attention(q, a, agent_v, 8 ** (-0.5 * 0.3)) + 0.075 * v.double()
        expected = plan.unmerge(attn.to_out[0](y.float().flatten(2)))
    assert agents.shape[1] == 16
    assert max_diff(out, expected) < 1e-5


def test_layers_below_max_downsample_and_masked_calls_run_stock():
    torch.manual_seed(6)
    method = AgentAttention(late_start=1.0)
    attn, _ = make_site_layer(method, (32, 32))  # the layer holds 16 x 16 tokens: downsample 2
    x = torch.randn(2, 256, 32)
    with torch.no_grad():
        out = attn(x)
        attn.set_processor(attnpack.DenseAttention())
        assert max_diff(out, attn(x)) == 0
        attn.set_processor(AgentAttention(late_start=1.0, max_downsample=2))
        assert max_diff(out, attn(x)) > 1e-4


# ---- schedule and validation


def test_stage_switches_at_the_step_fraction():
    method = AgentAttention()
    ctx = AttnContext()
    stages = []
    for step in range(50):
        ctx.set_step(step, 50)
        stages.append(method.stage(ctx)[2])
    assert stages == [4] * 20 + [2] * 30
    ctx.set_step(3, 7)  # 0.4 x 7 = 2.8: stage 2 from step 3
    assert method.stage(ctx) == (0.4, 0.5, 2, 2)
    with pytest.raises(RuntimeError, match="late_start=1"):
        method.stage(AttnContext())
    assert AgentAttention(late_start=1.0).stage(AttnContext()) == (0.4, 0.95, 4, 4)


@pytest.mark.parametrize("name", ["ratio", "agent_ratio", "late_ratio", "late_agent_ratio"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_bad_ratio_raises(name, value):
    with pytest.raises(ValueError, match=rf"{name}={value}.*\[0, 1\)"):
        AgentAttention(**{name: value})


def test_bad_settings_name_themselves():
    with pytest.raises(ValueError, match="sx=0"):
        AgentAttention(sx=0)
    with pytest.raises(ValueError, match="late_start=2"):
        AgentAttention(late_start=2)
    with pytest.raises(ValueError, match="'sd3'"):
        AgentAttention.preset("sd3")
    with pytest.raises(ValueError, match="agent_grid=0"):
        PooledAgentAttention(agent_grid=0)
    assert AgentAttention.preset("sdxl").max_downsample == 2 and AgentAttention.preset("sd2").fp32


# ---- tiny pipelines


def count_agent_calls(monkeypatch):
    return record_calls(
        monkeypatch, agent_module, "agent_attention", lambda query, agents, *_, **__: agents.shape[1]
    )


@pytest.mark.parametrize(
    "name, settings", [("tiny-sd1.5", {}), ("tiny-sdxl", {"max_downsample": 2}), ("tiny-animatediff", {})]
)
def test_tiny_unet_pipelines(name, settings, monkeypatch):
    pipe = tiny_pipeline(name)
    stock = run_tiny(pipe, name)
    handle = attnpack.apply(pipe, "agent", ratio=0.0, late_ratio=0.0, **settings)
    assert max_diff(run_tiny(pipe, name), stock) == 0  # nothing merged: the stock output
    handle.remove()

    calls = count_agent_calls(monkeypatch)
    handle = attnpack.apply(pipe, "agent", **settings)
    out = run_tiny(pipe, name)
    again = run_tiny(pipe, name)
    handle.remove()
    assert calls, "the agent path never ran"
    assert torch.isfinite(out).all() and max_diff(out, again) == 0  # seeded destinations: reproducible
    assert 0 < max_diff(out, stock) < 0.5
    assert max_diff(run_tiny(pipe, name), stock) == 0


def test_sdxl_needs_max_downsample_2_to_act(monkeypatch):
    pipe = tiny_pipeline("tiny-sdxl")
    calls = count_agent_calls(monkeypatch)
    attnpack.apply(pipe, AgentAttention())
    run_tiny(pipe, "tiny-sdxl")
    assert calls == []  # its highest-resolution level has no attention


@pytest.mark.parametrize("name, agent_grid", [("tiny-flux", 2), ("tiny-wan-t2v", 1)])  # Wan's grid: 3 x 2 x 3
def test_pooled_agents_on_dits(name, agent_grid, monkeypatch):
    pipe = tiny_pipeline(name)
    stock = run_tiny(pipe, name)
    calls = count_agent_calls(monkeypatch)
    handle = attnpack.apply(pipe, "pooled_agent", agent_grid=agent_grid)
    out = run_tiny(pipe, name)
    handle.remove()
    assert calls and torch.isfinite(out).all() and max_diff(out, stock) > 0
    # agents that would not save work: dense, the stock output
    handle = attnpack.apply(pipe, "pooled_agent", agent_grid=64)
    assert max_diff(run_tiny(pipe, name), stock) < 1e-5
    handle.remove()


def test_pooled_agents_are_pooled_queries(monkeypatch):
    """On FLUX's joint attention: agents are 2 x 2 means of the image queries, text rows stay dense."""
    seen = {}
    original = agent_module.agent_attention

    def spy(query, agents, key, value, **kwargs):
        seen.setdefault("args", (query, agents, key, value, kwargs))
        return original(query, agents, key, value, **kwargs)

    monkeypatch.setattr(agent_module, "agent_attention", spy)
    pipe = tiny_pipeline("tiny-flux")
    attnpack.apply(pipe, "pooled_agent", agent_grid=2)
    run_tiny(pipe, "tiny-flux")
    query, agents = seen["args"][:2]
    height, width = attnpack.attach(pipe).grid  # the attached context, as apply left it
    planes = query.unflatten(1, (height, width))
    pooled = planes.unflatten(1, (2, height // 2)).unflatten(3, (2, width // 2)).mean(dim=(2, 4))
    assert max_diff(agents, pooled.flatten(1, 2)) < 1e-5


# ---- on a CUDA device


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_best_match_at_sd15_size(dtype):
    """Stage 1 at 512²: 3840 sources against 256 destinations, 320 channels."""
    src = torch.nn.functional.normalize(torch.randn(2, 3840, 320, device="cuda"), dim=-1).to(dtype)
    dst = torch.nn.functional.normalize(torch.randn(2, 256, 320, device="cuda"), dim=-1).to(dtype)
    value, index = best_match(src, dst)
    ref_value, _ = best_match(src, dst, backend="reference")
    assert max_diff(value, ref_value) < 1e-3
    picked = (src.float() @ dst.float().transpose(1, 2)).gather(2, index[..., None]).squeeze(2)
    assert max_diff(picked, ref_value) < 1e-3


@pytest.mark.gpu
def test_gpu_tiny_sd15_in_half_precision():
    pipe = tiny_pipeline("tiny-sd1.5").to("cuda", torch.float16)
    with attnpack.apply(pipe, "agent"):
        out = run_tiny(pipe, "tiny-sd1.5")
    assert torch.isfinite(out).all()


# ---- what the matching compares


@pytest.mark.parametrize("match_on", ["block_input", "normed"])
def test_matching_reads_the_block_input_as_agentsd_does(monkeypatch, match_on):
    """AgentSD's patch (after ToMeSD) matches tokens on the transformer block's input and merges the normed
    states; match_on="normed" matches on the normed states too."""
    from diffusers.models.attention import BasicTransformerBlock

    pipe = tiny_pipeline("tiny-sd1.5")
    metrics, merged, block_inputs, attn_inputs = [], [], [], []
    original = agent_module.plan_merge

    def spy(metric, grid, **kwargs):
        metrics.append(metric)
        plan = original(metric, grid, **kwargs)
        merged.append(plan)
        return plan

    monkeypatch.setattr(agent_module, "plan_merge", spy)
    blocks = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]
    hooks = [b.register_forward_pre_hook(lambda m, a, k: block_inputs.append(a[0] if a else k["hidden_states"]),
                                         with_kwargs=True) for b in blocks]  # fmt: skip
    hooks += [b.attn1.register_forward_pre_hook(lambda m, a, k: attn_inputs.append(a[0] if a else k["hidden_states"]),
                                                with_kwargs=True) for b in blocks]  # fmt: skip
    with attnpack.apply(pipe, "agent", max_downsample=2, match_on=match_on):
        run_tiny(pipe, "tiny-sd1.5", num_inference_steps=1)
    for hook in hooks:
        hook.remove()
    assert metrics and any(plan is not None for plan in merged)
    expected = block_inputs if match_on == "block_input" else attn_inputs
    for metric in metrics:
        assert any(metric is seen for seen in expected)
        assert not any(
            metric is seen for seen in (attn_inputs if match_on == "block_input" else block_inputs)
        )


def test_match_on_is_checked_and_set_attn_processor_says_it_cannot_see_the_block(caplog, monkeypatch):
    monkeypatch.setattr("attnpack.kernels.dispatch._logged", set())  # said once per process: forget it
    with pytest.raises(
        ValueError, match=r"match_on='input' is not accepted; choose one of 'block_input', 'normed'"
    ):
        AgentAttention(match_on="input")
    torch.manual_seed(6)
    attn, _ = make_site_layer(AgentAttention(late_start=1.0, max_downsample=2), (32, 32))
    with caplog.at_level("INFO", logger="attnpack"), torch.no_grad():
        attn(torch.randn(2, 256, 32))
    assert "was not seen" in caplog.text
