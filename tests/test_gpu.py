"""The GPU path (skipped without CUDA): device auto, one move of the weights, fp32/bf16/fp16."""

import gc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vla_foundry import load_model
from vla_foundry.devices import resolve_device, resolve_model_dtype
from vla_foundry.pipelines import load_pipeline
from vla_foundry.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def _no_tf32_convolutions():
    """The fixtures' expected outputs were recorded in float32 on the CPU. cuDNN convolutions default to TF32 on
    CUDA (about 5e-4 relative error each), which ten UNet steps or a ViT's patch embedding carry past these
    tolerances. (Matrix products default to full float32 already.) Restored after this module."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def test_auto_picks_cuda0():
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_model_dtype("auto", torch.device("cuda:0"), "amp_bfloat16") == torch.bfloat16
    assert resolve_model_dtype("auto", torch.device("cuda:0"), "fp32") == torch.float32


def test_load_model_auto_dtype_follows_the_run_on_cuda(tmp_path):
    from tests.factories import tiny_model, tiny_transformer_params
    from vla_foundry.checkpoint import save_experiment

    for precision, expected in (("amp_bf16", torch.bfloat16), ("fp32", torch.float32)):
        save_experiment(tiny_model(tiny_transformer_params()), tmp_path / precision, precision=precision)
        model = load_model(tmp_path / precision, device="cuda", dtype="auto")
        assert {p.dtype for p in model.parameters()} == {expected}


def test_fixture_on_cuda_fp32_matches(transformer_fixture):
    model = load_model(transformer_fixture, device="cuda")
    assert all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))
    e = load_file(transformer_fixture / "expected" / "forward.safetensors")
    logits = model(input_ids=e["input.input_ids"].cuda()).logits.cpu()
    assert torch.allclose(logits, e["output.logits"], atol=1e-4)
    for case in ("generate", "generate_padded"):
        g = load_file(transformer_fixture / "expected" / f"{case}.safetensors")
        for use_cache in (True, False):
            out = model.generate(g["input.input_ids"].cuda(), g["input.attention_mask"].cuda(), max_new_tokens=8,
                                 temperature=0.0, use_cache=use_cache).cpu()
            assert torch.equal(out, g["output.tokens_use_cache" if use_cache else "output.tokens_no_cache"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_generation(tiny_checkpoints, dtype):
    reference = load_model(tiny_checkpoints["transformer"], device="cuda")
    model = load_model(tiny_checkpoints["transformer"], device="cuda", dtype=dtype)
    assert all(p.dtype == getattr(torch, dtype) and p.is_cuda for p in model.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9]], device="cuda")
    assert torch.allclose(model(ids).logits.float(), reference(ids).logits, atol=5e-2)
    pipeline = load_pipeline(tiny_checkpoints["transformer"], device="cuda", dtype=dtype)
    sampling = SamplingParams(max_new_tokens=16, temperature=0.8)
    a = pipeline.complete(["the quick brown", "a robot"], sampling=sampling, seed=4)
    b = pipeline.complete(["the quick brown", "a robot"], sampling=sampling, seed=4)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert all(len(c.token_ids) > 0 for c in a.completions)


def test_service_serves_on_cuda_in_bf16(tiny_checkpoints):
    from service import DeploymentSpec
    from tests.service.conftest import serving

    spec = DeploymentSpec(name="gpu", checkpoint=str(tiny_checkpoints["transformer"]), dtype="bfloat16")
    with serving(spec, device="auto") as client:
        info = client.get("/models/gpu").json()
        assert (info["device"], info["dtype"], info["status"]) == ("cuda:0", "bfloat16", "ready")
        response = client.post("/predict/transformer", json={"prompt": "the quick", "max_new_tokens": 8, "seed": 1})
        assert response.status_code == 200, response.text
        assert len(response.json()["completions"][0]["token_ids"]) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_matches_eager(tiny_checkpoints, dtype):
    model = load_model(tiny_checkpoints["transformer"], device="cuda", dtype=dtype)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], device="cuda")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device="cuda")
    with torch.inference_mode():
        eager = model.generate(prompt, mask, max_new_tokens=24, temperature=0.0)
        graph = model.generate(prompt, mask, max_new_tokens=24, temperature=0.0, cuda_graph=True)
        again = model.generate(prompt, mask, max_new_tokens=24, temperature=0.0, cuda_graph=True)  # replayed
        assert torch.equal(graph, again)
        if dtype == "float32":  # in bf16 the tiny random model's near-tied logits flip between kernels; see below
            assert (graph == eager).float().mean() > 0.99
        # logits of one decode step, graph vs eager, from the same cache
        from vla_foundry.models.cuda_graph_decode import graph_decoder

        out = model(prompt, attention_mask=mask, use_cache=True)
        decoder = graph_decoder(model, 2, 5 + 24)
        decoder.prefill(out.past_key_values, mask)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        graph_logits = decoder.step(token, position=5).clone()
        eager_logits = model(token, attention_mask=torch.cat([mask, torch.ones_like(token)], 1),
                             past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        tolerance = 1e-4 if dtype == "float32" else 5e-2
        assert torch.allclose(graph_logits.float(), eager_logits.float(), atol=tolerance)


def test_vlm_fixture_on_cuda_fp32_matches(fixtures_dir):
    path = fixtures_dir / "vlm_basic"
    model = load_model(path, device="cuda")
    e = load_file(path / "expected" / "forward.safetensors")
    logits = model(e["input.input_ids"].cuda(), e["input.pixel_values"].cuda()).logits.cpu()
    assert torch.allclose(logits, e["output.logits"], atol=1e-4)
    g = load_file(path / "expected" / "generate.safetensors")
    for use_cache in (True, False):
        out = model.generate(g["input.input_ids"].cuda(), g["input.pixel_values"].cuda(),
                             g["input.attention_mask"].cuda(), max_new_tokens=6, temperature=0.0,
                             use_cache=use_cache).cpu()
        assert torch.equal(out, g["output.tokens_use_cache" if use_cache else "output.tokens_no_cache"])


@pytest.mark.parametrize("model_type", ["transformer_hf", "vlm", "vlm_hf"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_new_types_on_cuda(tiny_checkpoints, model_type, dtype):
    """Greedy with the cache equals greedy without it on CUDA, and seeded sampling repeats."""
    import numpy as np

    pipeline = load_pipeline(tiny_checkpoints[model_type], device="cuda", dtype=dtype)
    assert all(p.is_cuda and p.dtype == getattr(torch, dtype) for p in pipeline.model.parameters())
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    def run(**kwargs):
        if pipeline.modality == "caption":
            return pipeline.caption([[image], [image]], ["the quick brown", "a"], **kwargs).completions
        return pipeline.complete(["the quick brown", "a"], **kwargs).completions

    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    cached, uncached = run(sampling=greedy), run(sampling=greedy, use_cache=False)
    if dtype == "float32":
        assert [c.token_ids for c in cached] == [c.token_ids for c in uncached]
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0)
    assert [c.token_ids for c in run(sampling=sampled, seed=3)] == [c.token_ids for c in run(sampling=sampled, seed=3)]


def test_stable_diffusion_fixture_and_sampling_on_cuda(fixtures_dir, tiny_checkpoints):
    path = fixtures_dir / "stable_diffusion_basic"
    model = load_model(path, device="cuda")
    e = load_file(path / "expected" / "generate.safetensors")
    out = model.generate(2, "cuda", initial_noise=e["input.initial_noise"].cuda(),
                         step_noises=e["input.step_noises"].cuda())
    assert torch.allclose(out.sample.cpu(), e["output.final_sample"], atol=1e-4)
    pipeline = load_pipeline(tiny_checkpoints["stable_diffusion"], device="cuda", dtype="bfloat16")
    assert pipeline.model.scheduler.betas.dtype == torch.float32 and pipeline.model.scheduler.betas.is_cuda
    for scheduler in ("training", "dpmsolver++", "ddim", "euler"):
        a = pipeline.generate("a red circle", num_images=2, seed=3, scheduler=scheduler)
        b = pipeline.generate("a red circle", num_images=2, seed=3, scheduler=scheduler)
        assert all(x.shape == (16, 16, 3) for x in a.images)
        assert all((x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(a.images, b.images))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_diffusion_policy_fixture_and_serving_on_cuda(fixtures_dir, dtype):
    """The fixture's sampling on CUDA (fp32 matches; bf16 runs, seeded chunks repeat)."""
    import numpy as np

    from vla_foundry.robotics.observations import RawObservation

    path = fixtures_dir / "diffusion_policy_clip_basic"
    e = load_file(path / "expected" / "generate_actions_steps10.safetensors")
    model = load_model(path, device="cuda", dtype=dtype)
    inputs = {k[len("input."):]: v.cuda() for k, v in e.items() if k.startswith("input.")}
    if dtype == "bfloat16":
        inputs = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inputs.items()}
    noise = inputs.pop("initial_noise")
    out = model.generate_actions(**inputs, num_inference_steps=10, initial_noise=noise).float().cpu()
    tolerance = 1e-4 if dtype == "float32" else 0.1
    assert torch.allclose(out, e["output.actions"], atol=tolerance)
    pipeline = load_pipeline(path, device="cuda", dtype=dtype)
    frame = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    r = pipeline.robot_io
    sample = RawObservation({n: frame for n in r.image_names},
                            {f: np.zeros((r.past_steps + 1, r.field_dims[f]), np.float32)
                             for f in r.proprioception_fields}, "open the drawer")
    a, b = (pipeline.predict([sample], seed=4)["action_chunk"] for _ in range(2))
    assert np.isfinite(a).all() and np.array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_policy_cuda_graphs_equal_eager_for_every_bucket(tiny_checkpoints, dtype):
    """Captured at warm-up for every bucket up to 32; each batch size (padded to its bucket) answers as eager."""
    from vla_foundry.models.policy_graphs import CUDA_BUCKETS, GRAPH_TOLERANCE_LOW_PRECISION
    from vla_foundry.pipelines.action import PolicyRequest
    from tests.vla_foundry.test_diffusion_policy import observation

    path = tiny_checkpoints["diffusion_policy"]
    graphs = load_pipeline(path, device="cuda", dtype=dtype)
    eager = load_pipeline(path, device="cuda", dtype=dtype, cuda_graphs=False)
    graphs.warmup(max_batch_size=32)
    assert graphs.io()["sampling_graphs"] == "cuda_graph" and eager.io()["sampling_graphs"] == "eager"
    assert len(graphs.graphs) == len(CUDA_BUCKETS)
    atol = 1e-4 if dtype == "float32" else GRAPH_TOLERANCE_LOW_PRECISION
    for batch_size in (1, 2, 3, 4, 7, 8, 16, 17, 32):
        requests = [PolicyRequest(observation(graphs.robot_io, seed=i, instruction="go"), seed=i)
                    for i in range(batch_size)]
        for _ in range(2):  # captured, then replayed
            for out, want in zip(graphs.predict_each(requests), eager.predict_each(requests), strict=True):
                np.testing.assert_allclose(out.action_chunk, want.action_chunk, atol=atol)


def test_continuous_batching_on_cuda_gives_every_request_its_solo_tokens(transformer_fixture):
    """Requests of different sampling settings (greedy among them) decoding together on CUDA, fp32: each gets the
    tokens it gets alone (each generation samples its own rows on CUDA, see ``ContinuousBatcher._sample_together``)."""
    pipeline = load_pipeline(transformer_fixture, device="cuda")
    batcher = pipeline.continuous_batcher(max_sequences=8)
    rng = np.random.default_rng(3)
    settings = [SamplingParams(10, 0.0), SamplingParams(10, 1.0, 20, 0.9), SamplingParams(10, 1.0, 20, 0.9),
                SamplingParams(10, 0.7, 0, 0.8), SamplingParams(10, 1.5, 5, 1.0)]
    prompts = [rng.integers(0, pipeline.model.vocab_size, size=int(rng.integers(2, 9))).tolist() for _ in settings]
    outcomes = {}
    for i, (prompt, s) in enumerate(zip(prompts, settings)):
        batcher.submit(pipeline.start_completion(prompt_token_ids=[prompt], sampling=s, seed=20 + i),
                       lambda out, i=i: outcomes.__setitem__(i, out))
    together = 0
    while batcher.active:
        batcher.step()
        together = max(together, batcher.running_sequences)
    assert together == len(settings)
    buckets = batcher.decoder.graphs._buckets  # batched steps replayed from graphs, captured on first use
    assert buckets and all(b is not None and b.graph is not None for b in buckets.values())
    assert batcher.decode_mode == "cuda_graph"
    for i, (prompt, s) in enumerate(zip(prompts, settings)):
        solo = pipeline.complete(prompt_token_ids=[prompt], sampling=s, seed=20 + i)
        assert outcomes[i].completions[0].token_ids == solo.completions[0].token_ids, i


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_decode_steps_capture_a_cuda_graph_for_every_bucket(transformer_fixture, dtype):
    """At warm-up every (batch bucket, key length bucket) is captured and checked against the eager step
    (``slot_graphs.GRAPH_RTOL`` and its low-precision pair); then requests joining and leaving replay them, padded up
    to their bucket, and in fp32 each gets its solo tokens."""
    from tests.vla_foundry.test_continuous_batching import run_all

    pipeline = load_pipeline(transformer_fixture, device="cuda", dtype=dtype)
    batcher = pipeline.continuous_batcher(max_sequences=6)
    batcher.warmup()
    graphs = batcher.decoder.graphs
    assert batcher.decode_mode == "cuda_graph" and graphs.batch_buckets() == [1, 2, 4, 6]
    assert len(graphs._buckets) == 4 and all(b is not None and b.graph is not None for b in graphs._buckets.values())
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, pipeline.model.vocab_size, size=int(rng.integers(2, 9))).tolist() for _ in range(6)]
    lengths = [12, 3, 9, 12, 1, 7]
    arrivals = {0: [0, 1], 2: [2], 4: [3, 4], 5: [5]}
    outcomes = run_all(batcher, {step: [(i, pipeline.start_completion(
        prompt_token_ids=[prompts[i]], sampling=SamplingParams(lengths[i], 1.0, 20, 0.9), seed=i)) for i in names]
        for step, names in arrivals.items()})
    assert outcomes["most decoding together"] >= 3
    if dtype == "float32":
        for i in range(6):
            solo = pipeline.complete(prompt_token_ids=[prompts[i]], sampling=SamplingParams(lengths[i], 1.0, 20, 0.9),
                                     seed=i)
            assert outcomes[i].completions[0].token_ids == solo.completions[0].token_ids, i


def test_raw_pixels_made_floats_on_cuda_equal_the_hosts():
    """A policy's raw frames cross to the GPU as uint8 and become floats there: the same values as on the host."""
    import numpy as np

    from vla_foundry.robotics.processor import InputProcessor, RawPixels

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(6)]
    processor = InputProcessor(RawPixels(224), None)
    on_cuda = processor.pixel_values(frames, torch.device("cuda"))
    assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), processor.pixel_values(frames))


def test_a_lone_request_on_cuda_replays_the_one_row_graph_and_gets_its_solo_tokens(transformer_fixture):
    """On CUDA a lone sequence decodes from its slot through the one-row graph (an eager step there is bound by
    kernel launches), never on its own cache; fp32, so its tokens are its solo ones."""
    pipeline = load_pipeline(transformer_fixture, device="cuda")
    from tests.vla_foundry.test_slot_graphs import record_steps

    batcher = pipeline.continuous_batcher(max_sequences=4)
    rows_per_step = record_steps(batcher.decoder.graphs)
    prompt = np.random.default_rng(4).integers(0, pipeline.model.vocab_size, size=6).tolist()
    sampling = SamplingParams(10, 1.0, 20, 0.9)
    outcome = {}
    batcher.submit(pipeline.start_completion(prompt_token_ids=[prompt], sampling=sampling, seed=9),
                   lambda out: outcome.setdefault("lone", out))
    while batcher.active:
        batcher.step()
    assert rows_per_step == [(1, True)] * 9 and batcher.decode_mode == "cuda_graph"
    solo = pipeline.complete(prompt_token_ids=[prompt], sampling=sampling, seed=9)
    assert outcome["lone"].completions[0].token_ids == solo.completions[0].token_ids


@pytest.mark.parametrize("backbone", ["vlm_foundry_backbone", "vlm_backbone"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_policies_conditioned_by_a_vlm_on_cuda(tmp_path, backbone, dtype):
    """Policies with a whole VLM as backbone (spec §8.4) on CUDA: the CPU's chunk in float32 (bf16 within its
    rounding), and a batch of prompts of different lengths gives each robot its solo chunk."""
    from tests.factories import build_tiny_tokenizer, vlm_foundry_policy, vlm_hf_policy
    from vla_foundry.pipelines.action import ActionPipeline, PolicyRequest
    from vla_foundry.robotics.observations import RawObservation

    build = {"vlm_foundry_backbone": vlm_foundry_policy, "vlm_backbone": vlm_hf_policy}[backbone]
    build(tmp_path, build_tiny_tokenizer())
    cpu = ActionPipeline.from_experiment(load_model(tmp_path), tmp_path)
    gpu = ActionPipeline.from_experiment(load_model(tmp_path, device="cuda", dtype=dtype), tmp_path)
    r, rng = cpu.robot_io, np.random.default_rng(0)
    samples = [RawObservation({n: rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for n in r.image_names},
                              {f: rng.normal(size=(r.past_steps + 1, r.field_dims[f])).astype(np.float32)
                               for f in r.proprioception_fields}, text)
               for text in ("pick", "pick up the red block and place it in the bin", "pick")]
    # explicit noise: a CUDA generator draws other numbers than the CPU's for one seed
    noises = [rng.standard_normal((r.action_steps, r.action_dim)).astype(np.float32) for _ in samples]
    tolerance = 1e-4 if dtype == "float32" else 0.1
    batched = gpu.predict_each([PolicyRequest(s, seed=i, noise=n) for i, (s, n) in enumerate(zip(samples, noises))],
                               num_inference_steps=3)
    for sample, noise, chunk in zip(samples, noises, batched):
        alone = gpu.predict([sample], noise=noise, num_inference_steps=3)["action_chunk"][0]
        assert np.abs(chunk.action_chunk - alone).max() <= (1e-5 if dtype == "float32" else 0.05)
        on_cpu = cpu.predict([sample], noise=noise, num_inference_steps=3)["action_chunk"][0]
        assert np.abs(alone - on_cpu).max() <= tolerance
    assert len(gpu.graphs) and not gpu.graphs._refused  # the steps after the VLM replayed from CUDA graphs


def test_a_policy_in_a_model_process_on_cuda(fixtures_dir):
    """VLA_MODEL_PROCESS on a GPU: the child holds the model on CUDA (the server's copy stays on the CPU: this
    process allocates nothing on the device for it), /models says cuda, and the fixture's observation gets the
    fixture's actions, as the in-thread deployment does."""
    from service import DeploymentSpec
    from tests.service.conftest import serving
    from tests.service.test_action_api import fixture_requests

    spec = DeploymentSpec(name="policy", checkpoint=str(fixtures_dir / "diffusion_policy_clip_basic"), device="cuda",
                          dtype="float32")
    replies, grew = {}, {}
    for model_process in (True, False):
        gc.collect()  # earlier tests' tensors freed now, not while this one measures (an H100 run saw 344 KB go)
        before = torch.cuda.memory_allocated()
        with serving(spec, model_process=model_process, device="cuda") as client:
            info = client.get("/models/policy").json()
            assert info["device"].startswith("cuda") and (info["model_process"] is not None) == model_process
            grew[model_process] = torch.cuda.memory_allocated() - before
            if model_process:
                metrics = client.get("/metrics").text
                assert 'vla_model_process_cuda_memory_allocated_bytes{deployment="policy"}' in metrics, metrics
            replies[model_process] = []
            for body, expected in fixture_requests():
                reply = client.post("/predict/diffusion_policy", json=body)
                assert reply.status_code == 200, reply.text
                for field, values in expected.items():
                    np.testing.assert_allclose(np.array(reply.json()["actions"][field]), values, atol=1e-4)
                replies[model_process].append(reply.json()["action_chunk"])
    np.testing.assert_allclose(replies[True], replies[False], atol=1e-5)
    # The weights are in the child, which reports them; in-thread they are in this process (so the measure can tell).
    assert grew[True] <= 0 < grew[False], grew


@pytest.mark.parametrize("vocab,top_k", [(1000, 0), (50257, 0), (1000, 20)])
def test_draws_on_cuda_pick_what_torch_multinomial_picks(vocab, top_k):
    """``sampling.draw_groups`` reproduces multinomial's one-sample algorithm; on CUDA too: each request's exponential
    draws fill a slice of one tensor (at an offset that an odd vocabulary leaves unaligned), which must give the
    values and generator states of a tensor of its own."""
    from vla_foundry.sampling import draw_groups, token_distribution

    rows = [2, 1, 2]
    for seed in range(20):
        logits = torch.randn(5, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)) * 3
        probs, token_ids = token_distribution(logits, 1.0, top_k, 1.0)
        ours = [torch.Generator("cuda").manual_seed(seed * 10 + i) for i in range(3)]
        tokens, valid = draw_groups(probs, token_ids, list(zip(ours, rows)))
        expected, start = [], 0
        for i, n in enumerate(rows):
            own = torch.Generator("cuda").manual_seed(seed * 10 + i)
            picked = torch.multinomial(probs[start:start + n], 1, generator=own)
            expected.append((picked if token_ids is None else token_ids[start:start + n].gather(-1, picked))[:, 0])
            assert torch.equal(ours[i].get_state(), own.get_state())
            start += n
        assert valid == [True] * 3
        assert torch.equal(tokens, torch.cat(expected))
