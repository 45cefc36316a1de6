"""Every method under diffusers' context parallelism, on the CPU: 2 (and 4) gloo processes on loopback.

Each case runs the method in one process and under Ulysses, ring or both; the parallel output must equal
the single-process one (float32, 1e-5), and differ from dense attention where the method is sparse.
"""

import json
import re
import socket
from pathlib import Path

import parallel_cases
import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """suite -> {case: what rank 0 saw}; each suite is one spawn of its processes."""
    found = {}

    def run(world: int) -> dict:
        if world not in found:
            path = tmp_path_factory.mktemp("parallel") / f"world{world}.json"
            mp.spawn(parallel_cases.main, args=(world, _free_port(), str(world), str(path)), nprocs=world)
            found[world] = json.loads(path.read_text())
        return found[world]

    return run


def _cases(mode):
    return [
        pytest.param(
            mode,
            family,
            name,
            settings,
            id=f"{family}-{name}-{'-'.join(f'{k}{v}' for k, v in settings.items())}",
        )
        for family, name, settings, _ in parallel_cases.METHODS[mode]
    ]


def _check(result: dict) -> None:
    assert "error" not in result, result.get("trace", result.get("error"))
    assert result["diff"] <= 1e-5, result
    if result["sparse"]:
        assert result["vs_dense"] > 1e-4, f"the method did not change the output here: {result}"


@pytest.mark.parametrize(("mode", "family", "name", "settings"), _cases("ulysses") + _cases("ring"))
def test_two_ranks_equal_one_process(results, mode, family, name, settings):
    _check(results(2)[f"{mode}/{family}/{name}/{json.dumps(settings, sort_keys=True)}"])


@pytest.mark.parametrize(("mode", "family", "name", "settings"), _cases("ring x ulysses"))
def test_ring_times_ulysses_on_four_ranks(results, mode, family, name, settings):
    _check(results(4)[f"{mode}/{family}/{name}/{json.dumps(settings, sort_keys=True)}"])


@pytest.mark.parametrize("family", ["wan", "flux"])
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_removed_methods_leave_a_working_parallel_model(results, mode, family):
    removed = results(2)[f"{mode}/{family}/removed"]
    assert removed["configured"], "a restored stock processor lacks the model's parallel config"
    if mode == "ulysses":  # the stock processors run again, exactly
        assert removed["diff"] <= 1e-5


def test_hunyuan_video_stock_processors_are_refused_under_its_plan(results):
    for mode in ("ulysses", "ring"):
        removed = results(2)[f"{mode}/hunyuan_video/removed"]
        assert removed["configured"]
        assert "HunyuanVideoAttnProcessor2_0, whose text mask is wrong" in removed["error"]


@pytest.mark.parametrize(
    "key", ["backward/ring/wan/radial", "backward/ring/flux/clear", "backward/ulysses/wan/dense"]
)
def test_gradients_through_context_parallelism(results, key):
    result = results(2)[key]
    assert "error" not in result, result.get("trace")
    assert not result["missing"] and result["relative"] <= 1e-5, result


def test_gradients_through_ring_times_ulysses(results):
    result = results(4)["backward/ring x ulysses/flux/clear"]
    assert "error" not in result, result.get("trace")
    assert not result["missing"] and result["relative"] <= 1e-5, result


def test_bench_times_a_parallel_step(results):
    bench = results(2)["bench"]
    assert "error" not in bench, bench.get("trace")
    result = json.loads(Path(bench["path"]).read_text())
    assert result["benchmark"] == "radial-ulysses2"
    assert result["timing"]["parallel"] == "ulysses" and result["timing"]["ranks"] == 2
    assert result["models"][0]["seconds"]["dense"] > 0


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "refuse/ring/wan/pooled_agent/apply",
            r"PooledAgentAttention \('pooled_agent'\) on Wan .* ring_degree=2\).* supports ulysses",
        ),
        (
            "refuse/ring/wan/freenoise/forward",
            r"FreeNoiseAttention \('freenoise'\) on Wan .* ring_degree=2\).* supports ulysses",
        ),
        (
            "refuse/ulysses/flux/isolation/apply",
            r"IsolationAttention \('isolation'\) on FLUX.*: does not run under ContextParallelConfig\(ulysses_degree=2, ring_degree=1\); it supports no context parallelism",
        ),
    ],
)
def test_unsupported_combinations_raise(results, key, message):
    error = results(2)[key]["error"]
    assert error is not None and re.search(message, error), error


# ---- without processes: the checks and plans


def _config(**degrees):
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    return ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))


def test_families_without_context_parallelism_in_diffusers_raise():
    import attnpack
    from attnpack.families import FAMILIES
    from attnpack.parallel import check_supported

    for name in ("cogvideox", "sd3", "unet"):
        with pytest.raises(
            ValueError,
            match=r"does not run under ContextParallelConfig\(ulysses_degree=2, ring_degree=1\) on this family",
        ):
            check_supported(
                attnpack.DenseAttention(), FAMILIES[name], attnpack.Role.JOINT, _config(ulysses_degree=2)
            )
    with pytest.raises(ValueError, match="splits the sequence unevenly"):
        check_supported(
            attnpack.DenseAttention(),
            FAMILIES["wan"],
            attnpack.Role.SELF,
            _config(ulysses_degree=2, ulysses_anything=True),
        )


def test_tensor_parallelism_raises():
    from diffusers.models._modeling_parallel import ParallelConfig, TensorParallelConfig

    import attnpack
    from attnpack.families import FAMILIES
    from attnpack.parallel import check_supported

    config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    with pytest.raises(ValueError, match=r"TensorParallelConfig\(tp_degree=2\).*Use context parallelism"):
        check_supported(attnpack.RadialAttention(), FAMILIES["wan"], attnpack.Role.SELF, config)


def test_every_method_declares_what_it_supports():
    import attnpack

    for cls in attnpack.METHODS.values():
        assert cls.context_parallel <= {"ulysses", "ring"}
        ring_ready = cls.sparse_attention is not attnpack.AttentionMethod.sparse_attention
        assert "ring" not in cls.context_parallel or ring_ready, f"{cls.__name__} runs ring without a pattern"
        if cls.context_parallel != {"ulysses", "ring"}:
            assert cls.context_parallel_note, f"{cls.__name__} says nothing about what it does not support"


def test_context_parallel_plans():
    import attnpack
    from attnpack.pipelines.tiny import hunyuanvideo_transformer, wan_transformer

    wan = wan_transformer()
    assert attnpack.context_parallel_plan(wan) is type(wan)._cp_plan  # diffusers' own
    plan = attnpack.context_parallel_plan(hunyuanvideo_transformer())
    assert set(plan) == {"x_embedder", "context_embedder", "rope", "proj_out"}
    from attnpack.pipelines.tiny import build_cogvideox

    with pytest.raises(ValueError, match="no context-parallel plan for CogVideoXTransformer3DModel"):
        attnpack.context_parallel_plan(build_cogvideox().transformer)


def test_a_parallel_processor_without_attach_says_so():
    import attnpack
    from attnpack.pipelines.tiny import wan_transformer

    model = wan_transformer().eval()
    method = attnpack.DenseAttention()
    model.set_attn_processor(method)
    method._parallel_config = _config(ulysses_degree=2)  # what enable_parallelism sets
    inputs = parallel_cases.wan()[1]
    with pytest.raises(
        RuntimeError, match=r"runs under ContextParallelConfig\(ulysses_degree=2.*attnpack.attach"
    ):
        model(**inputs)
