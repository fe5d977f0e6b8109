"""``transformer_hf``: Hugging Face causal LMs (Llama, GPT-2) behind the ``transformer`` interface
(format spec §1.3, B6, B8) and the text pipeline on top."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from vla_foundry import load_model, save_experiment
from vla_foundry.checkpoint import read_checkpoint_file
from vla_foundry.demo.hf_models import CAUSAL_LM_FAMILIES, build_tiny_causal_lm
from vla_foundry.losses import IGNORE_INDEX
from vla_foundry.models.batch_handlers import LanguageModelBatchHandler
from vla_foundry.models.hf_loading import positions_from_mask
from vla_foundry.pipelines import load_pipeline
from vla_foundry.pipelines.text import pad_rows
from vla_foundry.sampling import SamplingParams
from tests.factories import sharpen_hf

ATOL = 1e-5
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def sharpen(hf_dir, seed=0, std=0.2):
    return sharpen_hf(hf_dir, "AutoModelForCausalLM", seed, std)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("causal_lm")
    return {f: sharpen(build_tiny_causal_lm(root / f, tiny_tokenizer, family=f)) for f in CAUSAL_LM_FAMILIES}


@pytest.fixture(scope="module")
def wrappers(hf_dirs):
    return {f: load_model(d) for f, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def references(hf_dirs):
    return {f: AutoModelForCausalLM.from_pretrained(d).eval() for f, d in hf_dirs.items()}


@pytest.fixture(scope="module", params=CAUSAL_LM_FAMILIES)
def family(request):
    return request.param


def padded(rows, pad=0):
    return pad_rows(rows, pad, left=True)


# ---------------------------------------------------------------------------------------------- forward


def test_bare_hf_directory_logits_equal_hf(family, wrappers, references):
    model = wrappers[family]
    assert model.params.type == "transformer_hf" and not model.checkpoint.ema
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    with torch.no_grad():
        ours = model(ids).logits
        theirs = references[family](input_ids=ids).logits
    assert ours.shape == (2, 5, model.vocab_size)
    assert torch.allclose(ours, theirs, atol=ATOL)


def test_experiment_with_model_prefixed_keys_loads(tiny_checkpoints):
    path = tiny_checkpoints["transformer_hf"]
    model = load_model(path)
    assert model.checkpoint.file.name == "checkpoint_1.pt"
    state_dict = read_checkpoint_file(model.checkpoint.file)["state_dict"]
    assert state_dict and all(k.startswith("model.") for k in state_dict)
    reference = AutoModelForCausalLM.from_pretrained(path / "hf_model").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(input_ids=ids).logits, atol=ATOL)


def test_left_padded_rows_get_positions_from_the_mask(family, wrappers):
    model = wrappers[family]
    ids, mask = padded(PROMPTS)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt])).logits[0]
            assert torch.allclose(batch[i, -len(prompt):], alone, atol=1e-4)
        # without the mask's positions an absolute-position model (GPT-2) would see shifted positions
        if family == "gpt2":
            unshifted = model.model(input_ids=ids, attention_mask=mask).logits
            row = PROMPTS[1]
            alone = model(torch.tensor([row])).logits[0]
            assert not torch.allclose(unshifted[1, -len(row):], alone, atol=1e-3)
    assert positions_from_mask(mask, 2).tolist() == [[5, 6], [0, 1], [2, 3]]


# ---------------------------------------------------------------------------------------------- generate


def test_greedy_cache_equals_no_cache_and_padded_rows_equal_solo(family, wrappers):
    model = wrappers[family]
    ids, mask = padded(PROMPTS)
    kw = dict(max_new_tokens=8, temperature=0.0, top_k=50, top_p=0.9)
    with_cache = model.generate(ids, mask, use_cache=True, **kw)
    without = model.generate(ids, mask, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    solos = []
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([prompt]), use_cache=True, **kw)[0, len(prompt):]
        assert torch.equal(with_cache[i, ids.shape[1]:], alone), (family, i)
        solos.append(alone.tolist())
    assert len({tuple(s) for s in solos}) == len(solos)  # the rows really differ


def test_seeded_sampling_is_reproducible(family, wrappers):
    model = wrappers[family]
    prompt = torch.tensor([[5, 6, 7]])

    def sample(seed):
        return model.generate(prompt, max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


# ---------------------------------------------------------------------------------------------- pipeline


def test_text_pipeline_finds_the_tokenizer_and_completes(family, hf_dirs):
    pipeline = load_pipeline(hf_dirs[family])
    assert pipeline.tokenizer is not None
    assert str(pipeline.tokenizer_source) == str(pipeline.model.params.hf_pretrained)
    assert pipeline.io()["accepts"] == ["prompt", "prompt_token_ids"]
    prompts = ["the quick brown", "a robot picks up the"]
    result = pipeline.complete(prompts, sampling=GREEDY)
    assert len(result.completions) == 2
    for prompt, completion in zip(prompts, result.completions):
        assert completion.text == pipeline.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        alone = pipeline.complete([prompt], sampling=GREEDY).completions[0]
        assert completion.token_ids == alone.token_ids
        assert len(completion.token_ids) == 8 or completion.finish_reason == "stop"
    no_cache = pipeline.complete(prompts, sampling=GREEDY, use_cache=False)
    assert [c.token_ids for c in no_cache.completions] == [c.token_ids for c in result.completions]


def test_text_pipeline_evaluate_equals_the_loss_by_hand(family, hf_dirs, references):
    pipeline = load_pipeline(hf_dirs[family])
    assert isinstance(pipeline.batch_handler, LanguageModelBatchHandler)
    texts = ["the quick brown fox jumps", "shall i compare"]
    out = pipeline.evaluate(texts=texts, seed=0)
    tok = pipeline.tokenizer
    rows = [tok.encode(t, add_special_tokens=False) for t in texts]
    ids, mask = pad_rows(rows, tok.pad_token_id)  # right-padded
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    with torch.no_grad():
        logits = references[family](input_ids=ids[:, :-1]).logits
    manual = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    assert out["loss"] == pytest.approx(manual.item(), abs=1e-5)
    assert out["num_tokens"] == sum(len(r) - 1 for r in rows)
    assert out["num_samples"] == 2


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_weights_load_into_the_top_level_wrapper(hf_dirs, tmp_path):
    """Reference bug B6 loaded EMA files into ``obj.model``; the keys are ``model.<HF keys>`` of the wrapper."""
    raw = load_model(hf_dirs["llama"])
    ema = {k: v * 0.5 + 0.01 for k, v in raw.state_dict().items()}
    save_experiment(raw, tmp_path / "exp", ema_state_dict=ema)
    loaded = load_model(tmp_path / "exp")
    assert loaded.checkpoint.ema and loaded.checkpoint.file.name == "ema_1.pt"
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    reference = AutoModelForCausalLM.from_pretrained(hf_dirs["llama"]).eval()
    reference.load_state_dict({k[len("model."):]: v for k, v in ema.items()})
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, reference(input_ids=ids).logits, atol=ATOL)
        not_ema = load_model(tmp_path / "exp", use_ema=False)
        assert not not_ema.checkpoint.ema
        assert torch.allclose(not_ema(ids).logits, raw(ids).logits, atol=ATOL)
        assert not torch.allclose(loaded(ids).logits, raw(ids).logits, atol=1e-3)
