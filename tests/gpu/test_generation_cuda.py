"""Generation serving on the GPU without Ray: lepton-ray's engine (continuous batching)
gives every sequence on CUDA what greedy decoding gives it alone; and, where vLLM is
installed, the folder ``serve.engine: vllm`` exports (``model.save_pretrained`` of a merged
model plus its tokenizer) loads in vLLM and answers greedily as transformers does. The
vLLM check is the GPU path of the generation API (``ray.serve.llm`` runs vLLM on that
folder); it is skipped, saying so, on a machine without vLLM."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lepton_ray.serve.engine import Engine, SamplingParams, text_of
from lepton_ray.tasks.causal_lm_eval import generate

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 17, 30, 40], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11], [1, 50], [1, 2, 3, 4, 5, 6]]


class _Ids:
    """A tokenizer stand-in for the engine: token ids written out as text."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{int(i)}>" for i in ids)


def _tiny_llama(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).to(device).eval()


def test_the_engine_batches_on_cuda_as_each_sequence_decodes_alone(cuda):
    model = _tiny_llama(cuda)
    engine = Engine(model, _Ids(), [], 0, 128, max_batch_size=3)
    with torch.inference_mode():
        seqs = engine.generate(PROMPTS, SamplingParams(12, temperature=0.0))
        for prompt, seq in zip(PROMPTS, seqs, strict=True):
            [(alone, _)] = generate(model, [prompt], [], 0, 12, cuda)
            assert seq.tokens == alone and text_of(seq) == _Ids().decode(alone)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_loads_the_exported_folder_and_decodes_greedily_as_transformers(cuda, tmp_path):
    from vllm import LLM
    from vllm import SamplingParams as VllmParams

    model = _tiny_llama(cuda)
    model.save_pretrained(tmp_path, safe_serialization=True)
    with torch.inference_mode():
        expected = [generate(model, [p], [], 0, 8, cuda)[0][0] for p in PROMPTS]
    del model
    torch.cuda.empty_cache()
    llm = LLM(
        model=str(tmp_path), skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3
    )
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        VllmParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False),
    )
    got = [list(out.outputs[0].token_ids) for out in outputs]
    assert got == expected
